// VM Servers (Managers): every server of the cluster, its Raft role, health, capacity and
// the VM copies it holds.

import { api, message } from "../api";
import { field, fill, h, onSubmit, value } from "../dom";
import { mib, pool } from "../format";
import type { PageContext } from "../page";
import type { Server } from "../types";

function badge(ok: boolean, yes: string, no: string): HTMLElement {
  return h("span", { class: ok ? "badge good" : "badge bad" }, ok ? yes : no);
}

export function serversPage(ctx: PageContext): void {
  const table = h("div");
  const addError = h("div", { class: "form-error hidden", role: "alert", "data-test": "server-add-error" });
  const addSubmit = h("button", { type: "submit", class: "primary", "data-test": "server-add-submit" }, "Add server");
  const addForm = h(
    "form",
    { class: "card form-card spaced", "data-test": "server-add" },
    h("h2", null, "Add a server"),
    h(
      "p",
      { class: "muted" },
      "Start the new server with enspeed server --id N --data DIR --listen ADDR --await-join; it shows a join token (also in DIR/join-token).",
    ),
    h(
      "div",
      { class: "row" },
      field("Address (host:port)", h("input", { name: "address", required: true, "data-test": "server-add-address" })),
      field("Join token", h("input", { name: "token", required: true, autocomplete: "off", class: "mono", "data-test": "server-add-token" })),
      addSubmit,
    ),
    addError,
  );
  onSubmit(
    addForm,
    addSubmit,
    addError,
    async () => {
      const s = await api<Server>("POST", "/servers", { address: value(addForm, "address"), token: value(addForm, "token") });
      ctx.notify("info", `Added server ${s.id} (${s.address})`);
      addForm.reset();
      last = "";
    },
    (e) => `Could not add the server at ${value(addForm, "address")}: ${message(e)}`,
  );
  // The cluster's join token, shown on demand (the read is on the audit log): what a new
  // server, or the appliance's installer, joins with.
  const joinToken = h("span", { class: "mono", "data-test": "join-token" }, "T");
  const showToken = h("button", { type: "button", "data-test": "join-token-show" }, "Show the join token");
  showToken.addEventListener("click", () => {
    api<{ address: string; token: string }>("GET", "/servers/join").then(
      (j) => {
        joinToken.textContent = j.token;
      },
      (e) => ctx.notify("error", `Could not read the cluster's join token: ${message(e)}`),
    );
  });
  fill(
    ctx.main,
    h("h1", null, "VM Servers"),
    h("p", { class: "lead" }, "Every server holds a vote in the cluster's Raft group; a witness votes and runs no VMs."),
    table,
    addForm,
    h(
      "p",
      { class: "muted", "data-test": "join-hint" },
      "Or join from the new server's own console: enspeed server --id N --data DIR --listen ADDR --join ",
      h("span", { class: "mono", "data-test": "join-address" }, ""),
      " --token ",
      joinToken,
      " (the appliance's installer asks for the same address and token). ",
      showToken,
      " Drain a server to move its VMs and disk copies away; a drained server can then be removed.",
    ),
  );
  let last = "";
  let busy = 0;
  const act = async (what: string, method: string, s: Server): Promise<void> => {
    busy = s.id;
    last = "";
    try {
      await api(method, method === "DELETE" ? `/servers/${s.id}` : `/servers/${s.id}/drain`, method === "DELETE" ? undefined : {});
      ctx.notify("info", `${what}: server ${s.id} (${s.address})`);
    } catch (e) {
      ctx.notify("error", `Could not ${what.toLowerCase()} server ${s.id} (${s.address}): ${message(e)}`);
    } finally {
      busy = 0;
      last = "";
    }
  };
  const button = (label: string, test: string, cls: string, disabled: boolean, title: string, onclick: () => void) =>
    h("button", { type: "button", class: cls, "data-test": test, disabled, title, onclick }, label);
  ctx.poll(async () => {
    const servers = await api<Server[]>("GET", "/servers");
    const leader = servers.find((s) => s.leader);
    const hint = ctx.main.querySelector("[data-test=join-address]");
    if (hint) hint.textContent = leader ? leader.address : "(the leader's address)";
    const key = JSON.stringify(servers);
    if (key === last) return;
    last = key;
    fill(
      table,
      h(
        "table",
        { class: "grid", "data-test": "servers-table" },
        h(
          "thead",
          null,
          h("tr", null, ["Server", "Address", "Role", "State", "Storage (blockd)", "Memory used/total", "Pools", "Primary VMs", "Backup VMs", "Operations"].map((t) => h("th", null, t))),
        ),
        h(
          "tbody",
          null,
          servers.map((s) =>
            h(
              "tr",
              { "data-test": "server-row", "data-server": s.id, class: s.down ? "down" : "" },
              h("td", { class: "num" }, String(s.id)),
              h("td", { class: "mono" }, s.address),
              h(
                "td",
                null,
                s.leader ? h("span", { class: "badge info", "data-test": "server-leader" }, "leader") : "follower",
                s.witness ? h("span", { class: "badge after" }, "witness") : null,
              ),
              h(
                "td",
                { "data-test": "server-state" },
                badge(!s.down, "up", "down"),
                s.draining ? h("span", { class: "badge after", "data-test": "server-draining" }, "draining") : null,
              ),
              h("td", null, s.witness ? h("span", { class: "muted" }, "--") : badge(s.blockd_up, "up", "not answering")),
              h("td", null, s.witness ? h("span", { class: "muted" }, "--") : `${mib(s.used_memory_mib)} / ${mib(s.memory_mib)}`),
              h(
                "td",
                null,
                s.witness || s.pools.length === 0
                  ? h("span", { class: "muted" }, "--")
                  : s.pools.map(([path, gib]) => h("div", null, `${pool(path)}: ${gib} GiB`)),
              ),
              h("td", { class: "num" }, String(s.primary_vms)),
              h("td", { class: "num" }, String(s.backup_vms)),
              h(
                "td",
                null,
                h(
                "div",
                { class: "ops" },
                s.witness
                  ? null
                  : button("Drain", "server-drain", "", busy !== 0 || (s.draining && s.primary_vms + s.backup_vms === 0), "move its VMs to their backups and its backup copies elsewhere", () => void act("Drain", "POST", s)),
                button(
                  "Remove",
                  "server-remove",
                  "danger",
                  busy !== 0 || s.primary_vms + s.backup_vms > 0 || servers.length <= 1,
                  s.primary_vms + s.backup_vms > 0 ? "drain it first: it holds VM disk copies" : "remove it from the cluster",
                  () => void act("Remove", "DELETE", s),
                ),
                ),
              ),
            ),
          ),
        ),
      ),
    );
  });
}

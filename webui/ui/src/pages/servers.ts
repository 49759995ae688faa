// VM Servers (Managers): every server of the cluster, its Raft role, health, capacity and
// the VM copies it holds.

import { api } from "../api";
import { fill, h } from "../dom";
import { mib, pool } from "../format";
import type { PageContext } from "../page";
import type { Server } from "../types";

function badge(ok: boolean, yes: string, no: string): HTMLElement {
  return h("span", { class: ok ? "badge good" : "badge bad" }, ok ? yes : no);
}

export function serversPage(ctx: PageContext): void {
  const table = h("div");
  fill(
    ctx.main,
    h("h1", null, "VM Servers"),
    h("p", { class: "lead" }, "Every server holds a vote in the cluster's Raft group; a witness votes and runs no VMs."),
    table,
  );
  let last = "";
  ctx.poll(async () => {
    const servers = await api<Server[]>("GET", "/servers");
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
          h("tr", null, ["Server", "Address", "Role", "State", "Storage (blockd)", "Memory used/total", "Pools", "Primary VMs", "Backup VMs"].map((t) => h("th", null, t))),
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
              h("td", { "data-test": "server-state" }, badge(!s.down, "up", "down")),
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
            ),
          ),
        ),
      ),
    );
  });
}

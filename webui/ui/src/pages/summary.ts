// Summary: the cluster's health as the caller may see it (servers and the Raft leader for a
// Manager), VMs running, replication health, and the caller's VMs one by one.

import { api } from "../api";
import { fill, h } from "../dom";
import { copyPlace, replication, status } from "../format";
import type { PageContext } from "../page";
import type { Server, Summary, Vm } from "../types";

function card(test: string, title: string, big: string, ...rest: (HTMLElement | string)[]): HTMLElement {
  return h(
    "div",
    { class: "card", "data-test": test },
    h("div", { class: "card-title" }, title),
    h("div", { class: "big" }, big),
    h("div", { class: "card-body" }, ...rest),
  );
}

function count(n: number, what: string, cls: string): HTMLElement {
  return h("span", { class: n > 0 ? `count ${cls}` : "count" }, h("b", null, String(n)), ` ${what}`);
}

export function summaryPage(ctx: PageContext): void {
  const manager = ctx.me.role === "manager";
  const cards = h("div", { class: "cards" });
  const list = h("div", { "data-test": "summary-vms-list" });
  fill(
    ctx.main,
    h("h1", null, "Summary"),
    cards,
    h("h2", null, manager ? "Virtual machines" : "Your virtual machines"),
    list,
  );
  let last = "";
  ctx.poll(async () => {
    const [s, vms, servers] = await Promise.all([
      api<Summary>("GET", "/summary"),
      api<Vm[]>("GET", "/vms"),
      manager ? api<Server[]>("GET", "/servers") : Promise.resolve(null),
    ]);
    const key = JSON.stringify([s, vms, servers]);
    if (key === last) return;
    last = key;
    const c: HTMLElement[] = [];
    if (s.servers) {
      const up = s.servers.total - s.servers.down;
      const leader = servers?.find((x) => x.id === s.servers?.leader);
      c.push(
        card(
          "summary-servers",
          "Servers",
          `${up} of ${s.servers.total} up`,
          count(up, "up", "good"),
          count(s.servers.down, "down", "bad"),
        ),
        card(
          "summary-leader",
          "Raft leader",
          leader ? `server ${leader.id}` : "none",
          leader ? leader.address : "no leader: changes wait until one is elected",
        ),
      );
    }
    c.push(
      card(
        "summary-vms",
        "Virtual machines",
        `${s.vms.running} of ${s.vms.total} running`,
        count(s.vms.running, "running", "good"),
        count(s.vms.stopped, "stopped", "off"),
      ),
      card(
        "summary-replication",
        "Replication",
        s.replication.degraded > 0 ? "degraded" : s.replication.resyncing > 0 ? "resyncing" : "healthy",
        count(s.replication.in_sync, "in sync", "good"),
        count(s.replication.resyncing, "resyncing", "warn"),
        count(s.replication.degraded, "degraded", "bad"),
      ),
    );
    if (s.users !== undefined) c.push(card("summary-users", "Users", String(s.users), "Managers, Power Users and Regular Users"));
    fill(cards, c);
    if (vms.length === 0) {
      fill(list, h("p", { class: "empty" }, manager || ctx.me.role === "power_user" ? "No virtual machines yet: create one under Virtual Machines." : "You own no virtual machine yet: your Power User creates it."));
      return;
    }
    fill(
      list,
      h(
        "table",
        { class: "grid", "data-test": "summary-vms" },
        h("thead", null, h("tr", null, h("th", null, "VMID"), h("th", null, "Name (owner)"), h("th", null, "Status"), h("th", null, "Replication"), h("th", null, "Primary VMM"), h("th", null, "Backup VMM"))),
        h(
          "tbody",
          null,
          vms.map((v) =>
            h(
              "tr",
              { "data-test": "summary-vm", "data-vmid": v.id },
              h("td", { class: "num" }, String(v.id)),
              h("td", null, v.name, h("span", { class: "muted" }, ` (${v.owner_name ?? "nobody"})`)),
              h("td", null, status(v.status)),
              h("td", null, replication(v.replication)),
              h("td", null, copyPlace(v.primary, "--")),
              h("td", null, copyPlace(v.backup, "No Backup VMM")),
            ),
          ),
        ),
      ),
    );
  });
}

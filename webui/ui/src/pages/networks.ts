// Networks (Managers): the networks VMs' cards are on. Each is a bridge of one name on every
// VM server, over an uplink NIC (or its VLAN device), optionally for one company's VMs only.

import { api, message } from "../api";
import { field, fill, h, showError } from "../dom";
import type { PageContext } from "../page";
import type { Network } from "../types";

export function networksPage(ctx: PageContext): void {
  let lastData = "";
  const table = h("div", { "data-test": "networks-wrap" });
  const input = (name: string, attrs: Record<string, string | number | boolean> = {}) =>
    h("input", { name, "data-test": `network-${name}`, ...attrs });
  const name = input("name", { required: true, maxlength: 63, pattern: "[A-Za-z0-9_][A-Za-z0-9._\\-]*" });
  const bridge = input("bridge", { required: true, maxlength: 15, placeholder: "br-lan" });
  const uplink = input("uplink", { maxlength: 15, placeholder: "eth1 (none: no uplink)" });
  const vlan = input("vlan", { type: "number", min: 1, max: 4094, placeholder: "untagged" });
  const subnet = input("subnet", { placeholder: "10.20.0.0/24" });
  const gateway = input("gateway", { placeholder: "its first address" });
  const dns = input("dns", { placeholder: "10.20.0.53, 10.20.0.54" });
  const company = input("company", { type: "number", min: 1, placeholder: "every tenant" });
  const submit = h("button", { type: "submit", class: "primary", "data-test": "network-create" }, "Create");
  const error = h("div", { class: "form-error hidden", role: "alert", "data-test": "network-error" });
  const form = h(
    "form",
    { class: "card form-card", "data-test": "network-form" },
    h("h2", null, "Define a network"),
    h("div", { class: "row" }, field("Name", name), field("Bridge", bridge), field("Uplink NIC", uplink)),
    h("div", { class: "row" }, field("VLAN", vlan), field("Subnet (DHCP)", subnet), field("Gateway", gateway), field("DNS servers", dns)),
    h("div", { class: "row" }, field("Company (Power User id)", company), submit),
    error,
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    error.classList.add("hidden");
    const body: Record<string, string | number | string[]> = { name: name.value.trim(), bridge: bridge.value.trim() };
    if (uplink.value.trim()) body.uplink = uplink.value.trim();
    if (vlan.value) body.vlan = Number(vlan.value);
    if (subnet.value.trim()) body.subnet = subnet.value.trim();
    if (gateway.value.trim()) body.gateway = gateway.value.trim();
    const servers = dns.value.split(/[\s,]+/).filter((d) => d !== "");
    if (servers.length) body.dns = servers;
    if (company.value) body.company = Number(company.value);
    submit.disabled = true;
    try {
      await api("POST", "/networks", body);
      ctx.notify("info", `Created network ${body.name}`);
      form.reset();
      refresh();
    } catch (e) {
      showError(error, `Could not create network ${body.name}: ${message(e)}`);
    } finally {
      submit.disabled = false;
    }
  });

  fill(
    ctx.main,
    h("h1", null, "Networks"),
    h("p", { class: "lead" }, "The networks VMs' cards are on: a bridge of the same name on every VM server."),
    form,
    table,
  );

  const refresh = ctx.poll(async () => {
    const l = await api<Network[]>("GET", "/networks");
    const key = JSON.stringify(l);
    if (key === lastData) return;
    lastData = key;
    draw(l);
  });

  async function remove(n: Network): Promise<void> {
    try {
      await api("DELETE", `/networks/${encodeURIComponent(n.name)}`);
      ctx.notify("info", `Deleted network ${n.name}`);
    } catch (e) {
      ctx.notify("error", `Could not delete network ${n.name}: ${message(e)}`);
    }
    refresh();
  }

  function draw(nets: Network[]): void {
    if (nets.length === 0) {
      fill(table, h("p", { class: "empty", "data-test": "networks-empty" }, "No networks yet: define one above."));
      return;
    }
    fill(
      table,
      h(
        "table",
        { class: "grid", "data-test": "networks-table" },
        h("thead", null, h("tr", null, ["Name", "Bridge", "Uplink", "VLAN", "Subnet", "Gateway, DNS", "For", "VMs", ""].map((t) => h("th", null, t)))),
        h(
          "tbody",
          null,
          nets.map((n) =>
            h(
              "tr",
              { "data-test": "network-row", "data-name": n.name },
              h("td", null, n.name),
              h("td", { class: "mono" }, n.bridge ?? "--"),
              h("td", { class: "mono" }, n.uplink ?? "--"),
              h("td", { class: "num" }, n.vlan !== undefined ? String(n.vlan) : "untagged"),
              h("td", { class: "mono" }, n.subnet ? `${n.subnet} (DHCP)` : "--"),
              h("td", { class: "mono" }, n.gateway ? [n.gateway, ...(n.dns ?? [])].join(", ") : "--"),
              h("td", null, n.company !== undefined ? `Power User ${n.company}'s company` : "every tenant"),
              h("td", { class: "num", "data-test": "network-vms" }, String(n.vms)),
              h(
                "td",
                null,
                h(
                  "button",
                  {
                    type: "button",
                    class: "danger",
                    "data-test": "network-delete",
                    disabled: n.vms > 0,
                    title: n.vms > 0 ? "its VMs' cards come off it first" : "delete it",
                    onclick: () => void remove(n),
                  },
                  "Delete",
                ),
              ),
            ),
          ),
        ),
      ),
    );
  }
}

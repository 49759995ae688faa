// Users: who the caller manages (a Manager: everyone; a Power User: itself and its Regular
// Users), creating users (a Power User creates Regular Users only), passwords, quotas (set by
// a Manager on a Power User) and deletion.

import { api, message } from "../api";
import { field, fill, h, onSubmit, value } from "../dom";
import { mib, ROLE_NAMES } from "../format";
import type { PageContext } from "../page";
import type { Role, User, Vm } from "../types";

/** What the panel above the table is doing for one user. */
type Panel = { kind: "password" | "quota"; user: User } | null;

export function usersPage(ctx: PageContext): void {
  const me = ctx.me;
  const manager = me.role === "manager";
  let users: User[] = [];
  let vms: Vm[] = [];
  let confirming: number | null = null;
  const busy = new Set<number>();
  let lastData = "";

  const create = createForm();
  const panel = h("div", { class: "hidden", "data-test": "user-panel" });
  const table = h("div");
  fill(ctx.main, h("h1", null, "Users"), create, panel, table);

  const refresh = ctx.poll(async () => {
    const [u, v] = await Promise.all([api<User[]>("GET", "/users"), api<Vm[]>("GET", "/vms")]);
    const key = JSON.stringify([u, v]);
    if (key === lastData) return;
    lastData = key;
    users = u;
    vms = v;
    drawParents();
    drawTable();
  });

  function roleChosen(): Role {
    return manager ? (value(create, "role") as Role) : "regular";
  }

  function showFor(): void {
    const role = roleChosen();
    create.querySelector(".parent-field")?.classList.toggle("hidden", !(manager && role === "regular"));
    create.querySelector(".quota-fields")?.classList.toggle("hidden", !(manager && role === "power_user"));
  }

  function drawParents(): void {
    const select = create.elements.namedItem("parent") as HTMLSelectElement | null;
    if (!select) return;
    const keep = select.value;
    fill(
      select,
      h("option", { value: "" }, "none"),
      users.filter((u) => u.role === "power_user").map((u) => h("option", { value: u.id }, u.name)),
    );
    select.value = keep;
    if (select.selectedIndex < 0) select.value = "";
  }

  function quotaInputs(q?: { vms: number; memory_mib: number; disk_gib: number }): HTMLElement[] {
    return [
      field("Quota: VMs", h("input", { name: "q_vms", type: "number", min: 0, value: q?.vms ?? 5, required: true, "data-test": "quota-vms" })),
      field("Quota: memory (MiB)", h("input", { name: "q_memory_mib", type: "number", min: 0, value: q?.memory_mib ?? 4096, required: true, "data-test": "quota-memory" })),
      field("Quota: disk (GiB)", h("input", { name: "q_disk_gib", type: "number", min: 0, value: q?.disk_gib ?? 50, required: true, "data-test": "quota-disk" })),
    ];
  }

  function quotaOf(f: HTMLFormElement): { vms: number; memory_mib: number; disk_gib: number } {
    return {
      vms: Number(value(f, "q_vms")),
      memory_mib: Number(value(f, "q_memory_mib")),
      disk_gib: Number(value(f, "q_disk_gib")),
    };
  }

  function formError(): HTMLElement {
    return h("div", { class: "form-error hidden", role: "alert", "data-test": "form-error" });
  }

  function createForm(): HTMLFormElement {
    const error = formError();
    const submit = h("button", { type: "submit", class: "primary", "data-test": "user-create-submit" }, "Create user");
    const role = manager
      ? field(
          "Role",
          h(
            "select",
            { name: "role", "data-test": "user-role" },
            (["regular", "power_user", "manager"] as Role[]).map((r) => h("option", { value: r }, ROLE_NAMES[r])),
          ),
        )
      : h("div", { class: "field" }, h("span", { class: "label" }, "Role"), h("span", { class: "fixed" }, "Regular User"));
    const f = h(
      "form",
      { class: "card form-card", "data-test": "user-create" },
      h("h2", null, manager ? "Create a user" : "Create a Regular User"),
      h(
        "div",
        { class: "row" },
        field("Name", h("input", { name: "name", required: true, maxlength: 63, autocomplete: "off", "data-test": "user-name" })),
        field("Password", h("input", { name: "password", type: "password", required: true, minlength: 8, autocomplete: "new-password", "data-test": "user-password" }), "8 characters or more"),
        role,
        manager ? h("div", { class: "parent-field" }, field("Power User", h("select", { name: "parent", "data-test": "user-parent" }))) : null,
        submit,
      ),
      manager ? h("div", { class: "row quota-fields hidden" }, quotaInputs()) : null,
      error,
    );
    f.addEventListener("change", (ev) => {
      if ((ev.target as HTMLElement).getAttribute("name") === "role") showFor();
    });
    let name = "";
    onSubmit(
      f,
      submit,
      error,
      async () => {
        const r = roleChosen();
        name = value(f, "name");
        const body: Record<string, unknown> = {
          name,
          password: (f.elements.namedItem("password") as HTMLInputElement).value,
          role: r,
        };
        if (manager && r === "regular" && value(f, "parent")) body.parent = Number(value(f, "parent"));
        if (manager && r === "power_user") body.quota = quotaOf(f);
        const u = await api<User>("POST", "/users", body);
        ctx.notify("info", `Created ${ROLE_NAMES[u.role]} ${u.name} (user ${u.id})`);
        (f.elements.namedItem("name") as HTMLInputElement).value = "";
        (f.elements.namedItem("password") as HTMLInputElement).value = "";
        refresh();
      },
      (e) => `Could not create user ${name}: ${message(e)}`,
    );
    return f;
  }

  function openPanel(p: Panel): void {
    if (!p) {
      panel.classList.add("hidden");
      fill(panel);
      return;
    }
    const error = formError();
    const save = h("button", { type: "submit", class: "primary", "data-test": "panel-save" }, "Save");
    const cancel = h("button", { type: "button", "data-test": "panel-cancel" }, "Cancel");
    cancel.addEventListener("click", () => openPanel(null));
    const u = p.user;
    const inputs =
      p.kind === "password"
        ? [
            field("New password", h("input", { name: "password", type: "password", required: true, minlength: 8, autocomplete: "new-password", "data-test": "panel-password" }), "8 characters or more"),
          ]
        : quotaInputs(u.quota);
    const f = h(
      "form",
      { class: "card form-card panel", "data-test": `panel-${p.kind}` },
      h("h2", null, p.kind === "password" ? `Set the password of ${u.name}` : `Set the quota of ${u.name}`),
      h("div", { class: "row" }, inputs, save, cancel),
      error,
    );
    onSubmit(
      f,
      save,
      error,
      async () => {
        const body =
          p.kind === "password"
            ? { password: (f.elements.namedItem("password") as HTMLInputElement).value }
            : { quota: quotaOf(f) };
        await api<User>("PATCH", `/users/${u.id}`, body);
        ctx.notify("info", p.kind === "password" ? `Set the password of ${u.name}` : `Set the quota of ${u.name}`);
        openPanel(null);
        refresh();
      },
      (e) => `Could not set the ${p.kind} of ${u.name}: ${message(e)}`,
    );
    fill(panel, f);
    panel.classList.remove("hidden");
    (f.querySelector("input") as HTMLInputElement | null)?.focus();
  }

  async function remove(u: User): Promise<void> {
    busy.add(u.id);
    drawTable();
    try {
      await api("DELETE", `/users/${u.id}`);
      ctx.notify("info", `Deleted user ${u.name}`);
    } catch (e) {
      ctx.notify("error", `Could not delete user ${u.name}: ${message(e)}`);
    } finally {
      busy.delete(u.id);
      confirming = null;
      drawTable();
      refresh();
    }
  }

  function manages(u: User): boolean {
    return manager || (u.role === "regular" && u.parent === me.id);
  }

  function actions(u: User): HTMLElement {
    const b = busy.has(u.id);
    const btn = (label: string, test: string, cls: string, f: () => void) =>
      h("button", { type: "button", class: cls, "data-test": test, disabled: b, onclick: f }, label);
    if (confirming === u.id) {
      return h(
        "div",
        { class: "ops confirm", "data-test": "confirm-delete" },
        h("span", null, `Delete ${u.name}?`),
        btn("Yes, delete", "confirm-delete-yes", "danger", () => void remove(u)),
        btn("Cancel", "confirm-delete-no", "", () => {
          confirming = null;
          drawTable();
        }),
      );
    }
    const ops: HTMLElement[] = [];
    if (u.id === me.id || manages(u)) ops.push(btn("Set password", "set-password", "", () => openPanel({ kind: "password", user: u })));
    if (manager && u.role === "power_user") ops.push(btn("Set quota", "set-quota", "", () => openPanel({ kind: "quota", user: u })));
    if (u.id !== me.id && manages(u))
      ops.push(
        btn("Delete", "delete", "danger", () => {
          confirming = u.id;
          drawTable();
        }),
      );
    return h("div", { class: "ops" }, ops);
  }

  function quotaText(u: User): string {
    const q = u.quota;
    if (!q) return "--";
    return `${q.used_vms}/${q.vms} VMs · ${mib(q.used_memory_mib)}/${mib(q.memory_mib)} · ${q.used_disk_gib}/${q.disk_gib} GiB disk`;
  }

  function drawTable(): void {
    const byId = new Map(users.map((u) => [u.id, u]));
    const vmById = new Map(vms.map((v) => [v.id, v]));
    fill(
      table,
      h(
        "table",
        { class: "grid", "data-test": "users-table" },
        h("thead", null, h("tr", null, ["ID", "Name", "Role", "Power User", "Quota used/limit", "VM", "Actions"].map((t) => h("th", null, t)))),
        h(
          "tbody",
          null,
          users.map((u) => {
            const parent = u.parent === null ? null : byId.get(u.parent);
            const vm = u.vm === undefined ? undefined : vmById.get(u.vm);
            return h(
              "tr",
              { "data-test": "user-row", "data-user": u.name, "data-id": u.id },
              h("td", { class: "num" }, String(u.id)),
              h("td", null, u.name, u.id === me.id ? h("span", { class: "muted" }, " (you)") : null),
              h("td", { "data-test": "user-role-name" }, ROLE_NAMES[u.role]),
              h("td", null, u.parent === null ? "--" : parent ? parent.name : `user ${u.parent}`),
              h("td", { "data-test": "user-quota" }, quotaText(u)),
              h("td", { "data-test": "user-vm" }, u.vm === undefined ? "--" : vm ? `${vm.id} (${vm.name})` : String(u.vm)),
              h("td", null, actions(u)),
            );
          }),
        ),
      ),
    );
  }

  showFor();
}

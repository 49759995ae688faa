// Your account: who you are, and changing your own password (every role may).

import { api, message } from "../api";
import { field, fill, h, onSubmit, showError } from "../dom";
import { mib, ROLE_NAMES } from "../format";
import type { PageContext } from "../page";
import type { User } from "../types";

export function accountPage(ctx: PageContext): void {
  const me = ctx.me;
  const about = h("dl", { class: "about", "data-test": "account-about" });
  const error = h("div", { class: "form-error hidden", role: "alert", "data-test": "form-error" });
  const save = h("button", { type: "submit", class: "primary", "data-test": "account-save" }, "Change password");
  const current = h("input", { name: "current", type: "password", required: true, autocomplete: "current-password", "data-test": "account-current-password" });
  const pw = h("input", { name: "password", type: "password", required: true, minlength: 8, autocomplete: "new-password", "data-test": "account-password" });
  const again = h("input", { name: "again", type: "password", required: true, minlength: 8, autocomplete: "new-password", "data-test": "account-password-again" });
  const form = h(
    "form",
    { class: "card form-card narrow", "data-test": "account-password-form" },
    h("h2", null, "Change your password"),
    field("Current password", current),
    field("New password", pw, "8 characters or more"),
    field("New password, again", again),
    error,
    h("div", { class: "row" }, save),
  );
  onSubmit(
    form,
    save,
    error,
    async () => {
      if (pw.value !== again.value) {
        showError(error, "The two passwords differ.");
        return;
      }
      await api<User>("PATCH", `/users/${me.id}`, { password: pw.value, current_password: current.value });
      current.value = "";
      pw.value = "";
      again.value = "";
      ctx.notify("info", "Your password is changed. Your other sessions were logged out.");
    },
    (e) => `Could not change your password: ${message(e)}`,
  );
  fill(ctx.main, h("h1", null, "Your account"), about, form);

  let last = "";
  ctx.poll(async () => {
    const u = await api<User>("GET", `/users/${me.id}`);
    const key = JSON.stringify(u);
    if (key === last) return;
    last = key;
    const q = u.quota;
    fill(
      about,
      h("dt", null, "Name"),
      h("dd", null, u.name),
      h("dt", null, "Role"),
      h("dd", null, ROLE_NAMES[u.role]),
      h("dt", null, "User id"),
      h("dd", null, String(u.id)),
      u.vm !== undefined ? [h("dt", null, "Your VM"), h("dd", null, `VMID ${u.vm}`)] : null,
      q
        ? [
            h("dt", null, "Quota"),
            h("dd", null, `${q.used_vms} of ${q.vms} VMs, ${mib(q.used_memory_mib)} of ${mib(q.memory_mib)} memory, ${q.used_disk_gib} of ${q.disk_gib} GiB disk in use`),
          ]
        : null,
    );
  });
}

// The login page: name and password; the API sets the session cookie.

import { api, message } from "../api";
import { field, fill, h, onSubmit, value } from "../dom";
import type { Session } from "../types";

export function loginPage(main: HTMLElement, onLogin: (s: Session) => void): void {
  const error = h("div", { class: "form-error hidden", role: "alert", "data-test": "login-error" });
  const submit = h("button", { type: "submit", class: "primary", "data-test": "login-submit" }, "Log in");
  const form = h(
    "form",
    { class: "login-form", "data-test": "login-form" },
    field("Name", h("input", { name: "name", autocomplete: "username", required: true, "data-test": "login-name" })),
    field(
      "Password",
      h("input", { name: "password", type: "password", autocomplete: "current-password", required: true, "data-test": "login-password" }),
    ),
    error,
    submit,
  );
  onSubmit(
    form,
    submit,
    error,
    async () => {
      const s = await api<Session>("POST", "/session", {
        name: value(form, "name"),
        password: (form.elements.namedItem("password") as HTMLInputElement).value,
      });
      onLogin(s);
    },
    message,
  );
  fill(
    main,
    h(
      "section",
      { class: "login", "data-test": "login" },
      h("div", { class: "login-brand" }, h("div", { class: "logo", "data-test": "login-logo" }, "EnSpeed"), h("p", null, "VM Orchestrator: virtual machines on your own servers, every disk on two of them.")),
      h("h1", null, "Log in"),
      form,
    ),
  );
  (form.elements.namedItem("name") as HTMLInputElement).focus();
}

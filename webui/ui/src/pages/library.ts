// Library Mgmt (Managers): the ISO images VMs boot installers from. An upload goes to the
// server this page came from, with its progress; the other servers copy it from there, and the
// list shows on how many VM servers each image is ready.

import { api, message, upload } from "../api";
import { field, fill, h, showError } from "../dom";
import { bytes, time } from "../format";
import type { PageContext } from "../page";
import type { Iso } from "../types";

/** The API's name rule for an ISO. */
const NAME = /^[A-Za-z0-9_][A-Za-z0-9._-]{0,62}$/;

export function libraryPage(ctx: PageContext): void {
  let isos: Iso[] = [];
  let lastData = "";
  const table = h("div", { "data-test": "isos-wrap" });
  const file = h("input", { type: "file", name: "file", accept: ".iso,application/x-iso9660-image", required: true, "data-test": "iso-file" });
  const name = h("input", { name: "name", required: true, maxlength: 63, pattern: "[A-Za-z0-9_][A-Za-z0-9._\\-]*", title: "letters, digits, '.', '_' or '-'", "data-test": "iso-name" });
  const submit = h("button", { type: "submit", class: "primary", "data-test": "iso-upload" }, "Upload");
  const bar = h("progress", { max: 100, value: 0, class: "hidden", "data-test": "iso-progress" });
  const progressText = h("span", { class: "muted", "data-test": "iso-progress-text" });
  const error = h("div", { class: "form-error hidden", role: "alert", "data-test": "iso-error" });
  const form = h(
    "form",
    { class: "card form-card", "data-test": "iso-form" },
    h("h2", null, "Upload an ISO image"),
    h("div", { class: "row" }, field("File", file), field("Name in the library", name), submit),
    h("div", { class: "row" }, bar, progressText),
    error,
  );
  file.addEventListener("change", () => {
    const f = file.files?.[0];
    if (f && !name.value) name.value = f.name.replace(/[^A-Za-z0-9._-]/g, "_").slice(0, 63);
  });
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    error.classList.add("hidden");
    const f = file.files?.[0];
    const n = name.value.trim();
    if (!f || !NAME.test(n)) {
      showError(error, "Choose a file and a name of letters, digits, '.', '_' or '-'.");
      return;
    }
    submit.disabled = true;
    bar.classList.remove("hidden");
    const started = Date.now();
    try {
      await upload<Iso>(`/isos/${encodeURIComponent(n)}`, f, (sent, total) => {
        const pct = total > 0 ? Math.floor((sent * 100) / total) : 0;
        bar.value = pct;
        const secs = Math.max((Date.now() - started) / 1000, 0.001);
        fill(progressText, `${pct}%: ${bytes(sent)} of ${bytes(total)}, ${bytes(sent / secs)}/s`);
      });
      fill(progressText, `Uploaded ${n}; the other servers copy it now.`);
      ctx.notify("info", `Uploaded ISO ${n}`);
      form.reset();
      refresh();
    } catch (e) {
      showError(error, `Could not upload ${n}: ${message(e)}`);
      fill(progressText, "");
    } finally {
      submit.disabled = false;
      bar.classList.add("hidden");
    }
  });

  fill(ctx.main, h("h1", null, "Library Mgmt"), h("p", { class: "lead" }, "ISO images for the VMs' CD-ROM drives. Every VM server keeps a checked copy of each."), form, table);

  const refresh = ctx.poll(async () => {
    const l = await api<Iso[]>("GET", "/isos");
    const key = JSON.stringify(l);
    if (key === lastData) return;
    lastData = key;
    isos = l;
    draw();
  });

  async function remove(iso: Iso): Promise<void> {
    try {
      await api("DELETE", `/isos/${encodeURIComponent(iso.name)}`);
      ctx.notify("info", `Deleted ISO ${iso.name}`);
    } catch (e) {
      ctx.notify("error", `Could not delete ISO ${iso.name}: ${message(e)}`);
    }
    refresh();
  }

  function draw(): void {
    if (isos.length === 0) {
      fill(table, h("p", { class: "empty", "data-test": "isos-empty" }, "No ISO images yet: upload one above."));
      return;
    }
    fill(
      table,
      h(
        "table",
        { class: "grid", "data-test": "isos-table" },
        h("thead", null, h("tr", null, ["Name", "Size", "Ready on", "In use by", "Uploaded", "SHA-256", ""].map((t) => h("th", null, t)))),
        h(
          "tbody",
          null,
          isos.map((i) => {
            const ready = i.servers.length >= i.vm_servers;
            return h(
              "tr",
              { "data-test": "iso-row", "data-name": i.name },
              h("td", null, i.name),
              h("td", { class: "num" }, bytes(i.size)),
              h(
                "td",
                { "data-test": "iso-ready" },
                h("span", { class: `badge ${ready ? "good" : "warn"}` }, `${i.servers.length} of ${i.vm_servers} VM servers`),
              ),
              h("td", null, i.in_use_by.length ? i.in_use_by.map((v) => `VM ${v}`).join(", ") : "--"),
              h("td", null, `${time(i.uploaded_ms)} by ${i.uploaded_by ?? "a deleted user"}`),
              h("td", { class: "mono", title: i.sha256 }, `${i.sha256.slice(0, 16)}…`),
              h(
                "td",
                null,
                h(
                  "button",
                  {
                    type: "button",
                    class: "danger",
                    "data-test": "iso-delete",
                    disabled: i.in_use_by.length > 0,
                    title: i.in_use_by.length ? "eject it from every VM first" : "delete it from every server",
                    onclick: () => void remove(i),
                  },
                  "Delete",
                ),
              ),
            );
          }),
        ),
      ),
    );
  }
}

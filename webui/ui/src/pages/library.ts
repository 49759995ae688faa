// Library Mgmt (Managers): the Virtual Appliances VMs are made from (imported as OVAs, or
// copied back from VMs), the tasks making them, and the ISO images VMs boot installers from.
// An upload goes to the server this page came from, with its progress; the other servers copy
// it from there, and the lists show on how many VM servers each is ready.

import { api, message, upload } from "../api";
import { field, fill, h, showError } from "../dom";
import { bytes, mib, time } from "../format";
import type { PageContext } from "../page";
import type { Appliance, Iso, Task, User } from "../types";

/** The API's name rule for an ISO. */
const NAME = /^[A-Za-z0-9_][A-Za-z0-9._-]{0,62}$/;

export function libraryPage(ctx: PageContext): void {
  let isos: Iso[] = [];
  let lastData = "";
  const table = h("div", { "data-test": "isos-wrap" });
  const form = uploadForm({
    test: "iso",
    title: "Upload an ISO image",
    accept: ".iso,application/x-iso9660-image",
    button: ["upload", "Upload"],
    name: (file) => file,
    kind: "iso",
    received: "Uploaded; checking it...",
    done: async (n) => {
      ctx.notify("info", `Uploaded ISO ${n}`);
      refresh();
      return `Uploaded ${n}; the other servers copy it now.`;
    },
    failed: (n, e) => `Could not upload ${n}: ${message(e)}`,
  });

  const appliances = appliancesSection(ctx);
  fill(
    ctx.main,
    h("h1", null, "Library Mgmt"),
    appliances,
    h("h2", null, "ISO images"),
    h("p", { class: "lead" }, "ISO images for the VMs' CD-ROM drives. Every VM server keeps a checked copy of each."),
    form,
    table,
  );

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

/** The appliance table (name, memory, Disk0-3 sizes, modify, select for deletion), the OVA
 * import form and the task list. */
function appliancesSection(ctx: PageContext): HTMLElement {
  let list: Appliance[] = [];
  let tasks: Task[] = [];
  let powerUsers: User[] = [];
  let lastData = "";
  /** The appliance whose Modify form is open. */
  let modifying: string | null = null;
  /** Appliances selected for deletion. */
  const selected = new Set<string>();
  const table = h("div", { "data-test": "appliances-wrap" });
  const taskTable = h("div", { "data-test": "tasks-wrap" });
  const form = uploadForm({
    test: "ova",
    title: "Import a Virtual Appliance",
    hint: "An OVA (OVF 1.x or 2.0) from any vendor, or a zip of disk images and an appliance.xml: disks as VMDK, qcow2 or raw.",
    accept: ".ova,.zip,application/x-tar,application/zip",
    button: ["import", "Import"],
    name: (file) => file.replace(/\.(ova|zip)$/i, ""),
    kind: "appliance",
    received: "Uploaded; checking the archive...",
    done: async (n, answer, say) => {
      // Its import is a task of the server that took it: followed here to its end.
      const task = answer as Task;
      refresh();
      for (;;) {
        const t = (await api<Task[]>("GET", "/tasks")).find((x) => x.id === task.id);
        if (!t || t.state === "failed") throw new Error(t?.reason ?? "its import task is gone");
        if (t.state === "done") break;
        say(`Importing ${n}: ${t.percent}% of its disks converted (task ${t.id})`);
        await new Promise((r) => setTimeout(r, 1000));
      }
      ctx.notify("info", `Imported appliance ${n}`);
      refresh();
      return `Imported ${n}; the other servers copy it now.`;
    },
    failed: (n, e) => `Could not import ${n}: ${message(e)}`,
  });

  /** Starts a download of `url` into appliance `name` (a task: its progress is in the list). */
  async function download(name: string, url: string, sha256: string | null, err: HTMLElement): Promise<boolean> {
    err.classList.add("hidden");
    try {
      await api("POST", `/appliances/${encodeURIComponent(name)}/download`, sha256 ? { url, sha256 } : { url });
      ctx.notify("info", `Downloading appliance ${name}: see its task below`);
      refresh();
      return true;
    } catch (e) {
      showError(err, `Could not download ${name}: ${message(e)}`);
      return false;
    }
  }

  const fromUrlError = h("div", { class: "form-error hidden", role: "alert", "data-test": "download-error" });
  const fromUrl = h(
    "form",
    { class: "card form-card", "data-test": "download-form" },
    h("h3", null, "Download a Virtual Appliance"),
    h("p", { class: "muted" }, "An OVA at a URL (http or https): a server downloads and imports it as a task."),
    h(
      "div",
      { class: "row" },
      field("Name", h("input", { name: "name", required: true, pattern: "[A-Za-z0-9_][A-Za-z0-9._\\-]{0,62}", "data-test": "download-name" })),
      field("URL", h("input", { name: "url", type: "url", required: true, size: 48, "data-test": "download-url" })),
      field("SHA-256 (optional)", h("input", { name: "sha256", pattern: "[0-9a-fA-F]{64}", size: 24, "data-test": "download-sha256" })),
      h("button", { type: "submit", class: "primary", "data-test": "download-start" }, "Download"),
    ),
    fromUrlError,
  );
  fromUrl.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const get = (n: string) => (fromUrl.elements.namedItem(n) as HTMLInputElement).value.trim();
    if (await download(get("name"), get("url"), get("sha256") || null, fromUrlError)) fromUrl.reset();
  });

  /** An appliance directory: its catalogue's URL, what it offers, each with a Download. */
  const directoryList = h("div", { "data-test": "directory-wrap" });
  const directoryError = h("div", { class: "form-error hidden", role: "alert", "data-test": "directory-error" });
  const directory = h(
    "form",
    { class: "card form-card", "data-test": "directory-form" },
    h("h3", null, "Appliance directory"),
    h("p", { class: "muted" }, "A catalogue (a JSON list of name, description, size, sha256, url): what it offers, checked by its SHA-256 when downloaded."),
    h(
      "div",
      { class: "row" },
      field("Catalogue URL", h("input", { name: "url", type: "url", required: true, size: 48, "data-test": "directory-url" })),
      h("button", { type: "submit", "data-test": "directory-open" }, "Show"),
    ),
    directoryError,
    directoryList,
  );
  directory.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    directoryError.classList.add("hidden");
    const url = (directory.elements.namedItem("url") as HTMLInputElement).value.trim();
    try {
      const entries = await api<DirectoryEntry[]>("GET", `/appliance-directory?url=${encodeURIComponent(url)}`);
      fill(
        directoryList,
        entries.length === 0
          ? h("p", { class: "empty" }, "The directory offers nothing.")
          : h(
              "table",
              { class: "grid", "data-test": "directory-table" },
              h("thead", null, h("tr", null, ["Name", "Size", "Description", ""].map((t) => h("th", null, t)))),
              h(
                "tbody",
                null,
                entries.map((e) =>
                  h(
                    "tr",
                    { "data-test": "directory-row", "data-name": e.name },
                    h("td", null, h("b", null, e.name)),
                    h("td", { class: "num" }, bytes(e.size)),
                    h("td", { class: "muted" }, e.description),
                    h(
                      "td",
                      null,
                      e.in_library
                        ? h("span", { class: "badge good" }, "in the library")
                        : h(
                            "button",
                            {
                              type: "button",
                              "data-test": "directory-download",
                              onclick: () => void download(e.name, e.url, e.sha256, directoryError),
                            },
                            "Download",
                          ),
                    ),
                  ),
                ),
              ),
            ),
      );
    } catch (e) {
      showError(directoryError, `Could not read the directory: ${message(e)}`);
    }
  });

  const refresh = ctx.poll(async () => {
    const [a, t, u] = await Promise.all([
      api<Appliance[]>("GET", "/appliances"),
      api<Task[]>("GET", "/tasks"),
      api<User[]>("GET", "/users"),
    ]);
    const key = JSON.stringify([a, t, u]);
    if (key === lastData) return;
    lastData = key;
    list = a;
    tasks = t;
    powerUsers = u.filter((x) => x.role === "power_user");
    for (const n of [...selected]) if (!list.some((x) => x.name === n)) selected.delete(n);
    draw();
    drawTasks();
  });

  async function removeSelected(): Promise<void> {
    for (const n of [...selected]) {
      try {
        await api("DELETE", `/appliances/${encodeURIComponent(n)}`);
        selected.delete(n);
        ctx.notify("info", `Deleted appliance ${n}`);
      } catch (e) {
        ctx.notify("error", `Could not delete appliance ${n}: ${message(e)}`);
      }
    }
    refresh();
  }

  function modifyForm(a: Appliance): HTMLElement {
    const err = h("div", { class: "form-error hidden", role: "alert", "data-test": "appliance-modify-error" });
    const save = h("button", { type: "submit", class: "primary", "data-test": "appliance-modify-save" }, "Save");
    const shares = powerUsers.map((p) =>
      h(
        "label",
        { class: "check" },
        h("input", { type: "checkbox", name: "share", value: p.id, checked: (a.shared_with ?? []).includes(p.id), "data-test": "appliance-share" }),
        `${p.name}'s company`,
      ),
    );
    const f = h(
      "form",
      { class: "card form-card", "data-test": "appliance-modify" },
      h("h3", null, `Modify ${a.name}`),
      h(
        "div",
        { class: "row" },
        field("Description", h("input", { name: "description", value: a.description, maxlength: 4096, "data-test": "appliance-description" })),
        field("Memory (MiB)", h("input", { name: "memory_mib", type: "number", min: 1, value: a.memory_mib, "data-test": "appliance-memory" })),
        field("vCPUs", h("input", { name: "vcpus", type: "number", min: 1, max: 255, value: a.vcpus, "data-test": "appliance-vcpus" })),
      ),
      h("div", { class: "row" }, h("span", { class: "label" }, "Shared with: "), shares.length ? shares : h("span", { class: "muted" }, "no Power Users yet")),
      h(
        "div",
        { class: "row" },
        save,
        h("button", { type: "button", "data-test": "appliance-modify-cancel", onclick: () => ((modifying = null), draw()) }, "Cancel"),
      ),
      err,
    );
    f.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      err.classList.add("hidden");
      const shared = [...f.querySelectorAll<HTMLInputElement>("input[name=share]")].filter((c) => c.checked).map((c) => Number(c.value));
      const get = (n: string) => (f.elements.namedItem(n) as HTMLInputElement).value;
      save.disabled = true;
      try {
        await api("PATCH", `/appliances/${encodeURIComponent(a.name)}`, {
          description: get("description"),
          memory_mib: Number(get("memory_mib")),
          vcpus: Number(get("vcpus")),
          shared_with: shared,
        });
        ctx.notify("info", `Changed appliance ${a.name}`);
        modifying = null;
        refresh();
      } catch (e) {
        // An edit that changes nothing is refused: nothing to save.
        showError(err, `Could not change ${a.name}: ${message(e)}`);
      } finally {
        save.disabled = false;
      }
    });
    return f;
  }

  function draw(): void {
    if (list.length === 0) {
      fill(table, h("p", { class: "empty", "data-test": "appliances-empty" }, "No appliances yet: import an OVA above, or copy a VM back."));
      return;
    }
    const disk = (a: Appliance, i: number) => (a.disks[i] ? bytes(a.disks[i].size) : "--");
    const rows = list.map((a) => {
      const ready = a.servers.length >= a.vm_servers;
      const box = h("input", {
        type: "checkbox",
        "data-test": "appliance-select",
        checked: selected.has(a.name),
        onchange: (ev: Event) => {
          if ((ev.target as HTMLInputElement).checked) selected.add(a.name);
          else selected.delete(a.name);
          draw();
        },
      });
      return h(
        "tr",
        { "data-test": "appliance-row", "data-name": a.name },
        h("td", null, box),
        h("td", { title: a.description }, h("b", null, a.name), a.description ? h("div", { class: "muted" }, a.description) : null),
        h("td", { class: "num" }, mib(a.memory_mib)),
        h("td", { class: "num" }, String(a.vcpus)),
        [0, 1, 2, 3].map((i) => h("td", { class: "num", "data-test": `appliance-disk${i}` }, disk(a, i))),
        h("td", null, a.boot.toUpperCase(), ", ", a.disk_bus === "sata" ? "SATA" : "virtio"),
        h("td", { "data-test": "appliance-ready" }, h("span", { class: `badge ${ready ? "good" : "warn"}` }, `${a.servers.length} of ${a.vm_servers} VM servers`)),
        h(
          "td",
          { class: "muted", title: a.origin },
          `${(a.origin || "--").replace(/\b([0-9a-f]{12})[0-9a-f]{52}\b/, "$1…")}; ${time(a.created_ms)} by ${a.created_by ?? "a deleted user"}`,
        ),
        h(
          "td",
          null,
          h("div", { class: "ops" },
            h("button", { type: "button", "data-test": "appliance-modify-open", onclick: () => ((modifying = a.name), draw()) }, "Modify"),
            h("a", { class: "button", href: `/api/v1/appliances/${encodeURIComponent(a.name)}/ova`, download: `${a.name}.ova`, "data-test": "appliance-export" }, "Export OVA"),
          ),
        ),
      );
    });
    const open = list.find((a) => a.name === modifying);
    fill(
      table,
      h(
        "table",
        { class: "grid", "data-test": "appliances-table" },
        h("thead", null, h("tr", null, ["", "Name", "Memory", "vCPUs", "Disk0", "Disk1", "Disk2", "Disk3", "Boots", "Ready on", "Origin", ""].map((t) => h("th", null, t)))),
        h("tbody", null, rows),
      ),
      h(
        "div",
        { class: "row" },
        h(
          "button",
          { type: "button", class: "danger", "data-test": "appliances-delete", disabled: selected.size === 0, onclick: () => void removeSelected() },
          selected.size ? `Delete ${selected.size} selected` : "Delete selected",
        ),
      ),
      open ? modifyForm(open) : null,
    );
  }

  function drawTasks(): void {
    if (tasks.length === 0) {
      fill(taskTable, h("p", { class: "empty", "data-test": "tasks-empty" }, "No tasks."));
      return;
    }
    fill(
      taskTable,
      h(
        "table",
        { class: "grid", "data-test": "tasks-table" },
        h("thead", null, h("tr", null, ["Task", "What", "By", "Started", "Progress", "State", ""].map((t) => h("th", null, t)))),
        h(
          "tbody",
          null,
          tasks.map((t) =>
            h(
              "tr",
              { "data-test": "task-row", "data-id": t.id, "data-state": t.state },
              h("td", { class: "num" }, String(t.id)),
              h("td", null, t.what),
              h("td", null, t.by ?? "--"),
              h("td", null, time(t.started_ms)),
              h("td", null, h("progress", { max: 100, value: t.percent }), ` ${t.percent}% of ${bytes(t.total_bytes)}`),
              h(
                "td",
                { "data-test": "task-state" },
                h("span", { class: `badge ${t.state === "done" ? "good" : t.state === "failed" ? "bad" : "warn"}` }, t.state),
                t.reason ? h("div", { class: "muted" }, t.reason) : null,
              ),
              h(
                "td",
                null,
                t.state === "running"
                  ? h(
                      "button",
                      {
                        type: "button",
                        "data-test": "task-cancel",
                        disabled: t.cancel,
                        onclick: async () => {
                          try {
                            await api("POST", `/tasks/${t.id}/cancel`);
                          } catch (e) {
                            ctx.notify("error", `Could not cancel task ${t.id}: ${message(e)}`);
                          }
                          refresh();
                        },
                      },
                      t.cancel ? "Cancelling" : "Cancel",
                    )
                  : null,
              ),
            ),
          ),
        ),
      ),
    );
  }

  return h(
    "section",
    { "data-test": "appliances" },
    h("h2", null, "Virtual Appliances"),
    h("p", { class: "lead" }, "VMs are made from these: their disks start as an appliance's images. Every VM server keeps a checked copy of each."),
    form,
    fromUrl,
    directory,
    table,
    h("h2", null, "Tasks"),
    taskTable,
  );
}

/** An appliance an appliance directory offers (`GET /api/v1/appliance-directory`). */
interface DirectoryEntry {
  name: string;
  description: string;
  size: number;
  sha256: string;
  url: string;
  in_library: boolean;
}

/** What an upload form of the library sends, and says. */
interface UploadForm {
  /** Its data-test prefix: `${test}-file`, `${test}-name`, `${test}-progress`, ... */
  test: string;
  title: string;
  hint?: string;
  accept: string;
  /** The submit button's data-test suffix and label. */
  button: [string, string];
  /** The library name a file's name suggests (before characters are replaced). */
  name: (file: string) => string;
  /** What the upload becomes. */
  kind: "iso" | "appliance";
  /** What the progress line says once every byte is sent, while the server works. */
  received: string;
  /**
   * Called with the last part's answer once the server took it (`say` updates the progress
   * line meanwhile); what the progress line then says. Throws if what followed failed.
   */
  done: (name: string, answer: unknown, say: (text: string) => void) => Promise<string>;
  /** The error shown when the upload failed. */
  failed: (name: string, e: unknown) => string;
}

/** A file and a name, uploaded to the server this page came from, with its progress. */
function uploadForm(o: UploadForm): HTMLFormElement {
  const file = h("input", { type: "file", name: "file", accept: o.accept, required: true, "data-test": `${o.test}-file` });
  const name = h("input", { name: "name", required: true, maxlength: 63, pattern: "[A-Za-z0-9_][A-Za-z0-9._\\-]*", title: "letters, digits, '.', '_' or '-'", "data-test": `${o.test}-name` });
  const submit = h("button", { type: "submit", class: "primary", "data-test": `${o.test}-${o.button[0]}` }, o.button[1]);
  const bar = h("progress", { max: 100, value: 0, class: "hidden", "data-test": `${o.test}-progress` });
  const progressText = h("span", { class: "muted", "data-test": `${o.test}-progress-text` });
  const error = h("div", { class: "form-error hidden", role: "alert", "data-test": `${o.test}-error` });
  const form = h(
    "form",
    { class: "card form-card", "data-test": `${o.test}-form` },
    h("h2", null, o.title),
    o.hint ? h("p", { class: "muted" }, o.hint) : null,
    h("div", { class: "row" }, field("File", file), field("Name in the library", name), submit),
    h("div", { class: "row" }, bar, progressText),
    error,
  );
  file.addEventListener("change", () => {
    const f = file.files?.[0];
    if (f && !name.value) name.value = o.name(f.name).replace(/[^A-Za-z0-9._-]/g, "_").slice(0, 63);
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
      const answer = await upload<unknown>(
        o.kind,
        n,
        f,
        (sent, total) => {
          const pct = total > 0 ? Math.floor((sent * 100) / total) : 0;
          bar.value = pct;
          const secs = Math.max((Date.now() - started) / 1000, 0.001);
          fill(progressText, sent < total ? `${pct}%: ${bytes(sent)} of ${bytes(total)}, ${bytes(sent / secs)}/s` : o.received);
        },
        (from, why) => fill(progressText, `${why}: resuming from ${bytes(from)}`),
      );
      const said = await o.done(n, answer, (t) => fill(progressText, t));
      form.reset();
      fill(progressText, said);
    } catch (e) {
      showError(error, o.failed(n, e));
      fill(progressText, "");
    } finally {
      submit.disabled = false;
      bar.classList.add("hidden");
    }
  });
  return form;
}

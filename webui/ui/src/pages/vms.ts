// Virtual Machines: the table of the 2008 product (VMID, Name (owner), Operations, Status,
// Primary VMM, Backup VMM) with replication health, a detail row per VM, and for a Manager or
// Power User a form to create one.

import { api, message } from "../api";
import { field, fill, h, onSubmit, value } from "../dom";
import { bytes, copyPlace, GIB, migrationLine, mib, replication, ROLE_NAMES, status, time } from "../format";
import type { PageContext } from "../page";
import type { Appliance, Iso, Network, Task, User, Vm } from "../types";

/** The white paper's detail row shows four disks. */
const DISK_SLOTS = 4;
/** A VM's network cards: 0-3. */
const NIC_SLOTS = [0, 1, 2, 3];

/** The addresses a VM's cards use, as its server sees them; a lease not yet taken says so. */
function ipText(vm: Vm): string {
  const parts = vm.nics
    .map((n) => {
      if (n.addresses.length > 0) return `${n.addresses.join(", ")} (${n.network})`;
      if (n.ip) return `${n.ip} (${n.network}, leased, not yet taken)`;
      return null;
    })
    .filter((p): p is string => p !== null);
  return parts.length > 0 ? parts.join("; ") : "not known";
}

/** How a VM boots, as the create and change forms offer it: "bios:ORDER", "uefi:ORDER" or "kernel". */
function bootField(test: string): HTMLElement {
  return field(
    "Boots",
    h(
      "select",
      { name: "boot", "data-test": test },
      h("option", { value: "bios:disk_first" }, "blank PC (BIOS): disk, then CD-ROM"),
      h("option", { value: "bios:cdrom_first" }, "blank PC (BIOS): CD-ROM first"),
      h("option", { value: "uefi:disk_first" }, "blank PC (UEFI): disk, then CD-ROM"),
      h("option", { value: "uefi:cdrom_first" }, "blank PC (UEFI): CD-ROM first"),
      h("option", { value: "kernel" }, "the cluster's guest system"),
    ),
  );
}

/** The controller a blank PC's disks are on (the guest system's are always virtio). */
function diskBusField(test: string): HTMLElement {
  return field(
    "Disk bus",
    h(
      "select",
      { name: "disk_bus", "data-test": test, title: "SATA: for installers without virtio drivers (Windows setup)" },
      h("option", { value: "virtio" }, "virtio (fastest; every modern OS)"),
      h("option", { value: "sata" }, "SATA (installers without virtio drivers)"),
    ),
  );
}

/** The disk bus a form's `diskBusField` names, for a blank PC only. */
function busChoice(f: HTMLFormElement, boot: string): { disk_bus?: string } {
  return boot === "kernel" ? {} : { disk_bus: value(f, "disk_bus") };
}

/** The boot mode and order a form's `bootField` names. */
function bootChoice(f: HTMLFormElement): { boot: string; boot_order?: string } {
  const [boot, boot_order] = value(f, "boot").split(":");
  return { boot, boot_order };
}

export function vmsPage(ctx: PageContext): void {
  const me = ctx.me;
  const creates = me.role !== "regular";
  let vms: Vm[] = [];
  let users: User[] = [];
  let isos: Iso[] = [];
  let appliances: Appliance[] = [];
  let tasks: Task[] = [];
  let networks: Network[] = [];
  /** VMs whose detail row is open. */
  const expanded = new Set<number>();
  /** A VM whose deletion waits for the user's confirmation. */
  let confirming: number | null = null;
  /** VMs with a request under way. */
  const busy = new Set<number>();
  /** The change form of each VM whose detail row was drawn: kept across redraws, so what
   * the user typed stays while the table refreshes. */
  const editForms = new Map<number, HTMLFormElement>();
  let lastData = "";

  const quota = h("p", { class: "quota hidden", "data-test": "quota" });
  const table = h("div", { "data-test": "vms-table-wrap" });
  const form = creates ? createForm() : null;
  fill(
    ctx.main,
    h("h1", null, "Virtual Machines"),
    quota,
    form,
    table,
  );

  const refresh = ctx.poll(async () => {
    const [v, u, i, n, a, t] = await Promise.all([
      api<Vm[]>("GET", "/vms"),
      creates ? api<User[]>("GET", "/users") : Promise.resolve([] as User[]),
      api<Iso[]>("GET", "/isos"),
      creates ? api<Network[]>("GET", "/networks") : Promise.resolve([] as Network[]),
      creates ? api<Appliance[]>("GET", "/appliances") : Promise.resolve([] as Appliance[]),
      api<Task[]>("GET", "/tasks"),
    ]);
    const key = JSON.stringify([v, u, i, n, a, t]);
    if (key === lastData) return;
    lastData = key;
    isos = i;
    networks = n;
    appliances = a;
    tasks = t;
    if (vms.length === 0 && me.role === "regular") for (const x of v) expanded.add(x.id);
    vms = v;
    users = u;
    drawQuota();
    if (form) {
      drawOwners(form);
      drawAppliances(form);
      drawIsos(form);
      drawNetworks(form);
    }
    drawTable();
  });

  function drawQuota(): void {
    const q = users.find((u) => u.id === me.id)?.quota;
    if (!q) return;
    fill(
      quota,
      h("b", null, "Your quota: "),
      `${q.used_vms} of ${q.vms} VMs, ${mib(q.used_memory_mib)} of ${mib(q.memory_mib)} memory, ${q.used_disk_gib} of ${q.disk_gib} GiB disk in use`,
    );
    quota.classList.remove("hidden");
  }

  /** The appliances the user may use, as what a new VM starts from, keeping the one chosen. */
  function drawAppliances(f: HTMLFormElement): void {
    const select = f.elements.namedItem("appliance") as HTMLSelectElement;
    const keep = select.value;
    fill(
      select,
      h("option", { value: "" }, "nothing: blank disks"),
      ...appliances.map((a) =>
        h(
          "option",
          { value: a.name, disabled: a.servers.length === 0 },
          `${a.name} (${a.disks.map((d) => bytes(d.size)).join(" + ")}${a.description ? `: ${a.description.slice(0, 60)}` : ""})`,
        ),
      ),
    );
    select.value = appliances.some((a) => a.name === keep) ? keep : "";
  }

  /** Takes the chosen appliance's VM as the form's defaults: its memory, vCPUs, firmware and
   * disk bus; its disks are its images' sizes unless the user asks for more. */
  function applianceChosen(f: HTMLFormElement): void {
    const a = appliances.find((x) => x.name === value(f, "appliance"));
    const input = (n: string) => f.elements.namedItem(n) as HTMLInputElement;
    const disk0 = input("disk_gib");
    if (!a) {
      disk0.required = true;
      disk0.placeholder = "";
      if (!disk0.value) disk0.value = "1";
      return;
    }
    input("memory_mib").value = String(a.memory_mib);
    input("vcpus").value = String(a.vcpus);
    (f.elements.namedItem("boot") as HTMLSelectElement).value = `${a.boot}:disk_first`;
    (f.elements.namedItem("disk_bus") as HTMLSelectElement).value = a.disk_bus;
    disk0.required = false;
    disk0.value = "";
    disk0.placeholder = `its image: ${bytes(a.disks[0]?.size ?? 0)}`;
  }

  /** The library's ISOs as choices for a new VM's CD-ROM, keeping the one chosen. */
  function drawIsos(f: HTMLFormElement): void {
    const select = f.elements.namedItem("iso") as HTMLSelectElement;
    const keep = select.value;
    fill(select, h("option", { value: "" }, "empty"), ...isos.map((i) => h("option", { value: i.name }, i.name)));
    select.value = isos.some((i) => i.name === keep) ? keep : "";
  }

  /** The networks the user may use, as choices for each of a new VM's cards, keeping those
   * chosen. */
  function drawNetworks(f: HTMLFormElement): void {
    for (const i of NIC_SLOTS) {
      const select = f.elements.namedItem(`nic${i}`) as HTMLSelectElement;
      const keep = select.value;
      fill(
        select,
        h("option", { value: "" }, "none"),
        ...networks.map((n) => h("option", { value: n.name }, n.subnet ? `${n.name} (${n.subnet}, DHCP)` : n.name)),
      );
      select.value = networks.some((n) => n.name === keep) ? keep : "";
    }
  }

  function drawOwners(f: HTMLFormElement): void {
    const select = f.elements.namedItem("owner") as HTMLSelectElement;
    const keep = select.value || String(me.id);
    fill(
      select,
      users.map((u) =>
        h(
          "option",
          { value: u.id, disabled: u.vm !== undefined },
          `${u.name} (${ROLE_NAMES[u.role]})${u.vm !== undefined ? `: owns VM ${u.vm}` : ""}`,
        ),
      ),
    );
    select.value = keep;
    if (select.selectedIndex < 0 || select.selectedOptions[0]?.disabled) select.value = String(me.id);
  }

  function createForm(): HTMLFormElement {
    const error = h("div", { class: "form-error hidden", role: "alert", "data-test": "form-error" });
    const submit = h("button", { type: "submit", class: "primary", "data-test": "vm-create-submit" }, "Create VM");
    const f = h(
      "form",
      { class: "card form-card", "data-test": "vm-create" },
      h("h2", null, "Create a virtual machine"),
      h(
        "div",
        { class: "row" },
        field("Name", h("input", { name: "name", required: true, maxlength: 63, pattern: "[A-Za-z0-9_][A-Za-z0-9._\\-]*", title: "letters, digits, '.', '_' or '-'", "data-test": "vm-name" })),
        field(
          "From appliance",
          h("select", { name: "appliance", "data-test": "vm-appliance", onchange: () => applianceChosen(f) }, h("option", { value: "" }, "nothing: blank disks")),
          "its disks start as the appliance's",
        ),
        field("Memory (MiB)", h("input", { name: "memory_mib", type: "number", min: 1, value: 128, required: true, "data-test": "vm-memory" })),
        field("vCPUs", h("input", { name: "vcpus", type: "number", min: 1, max: 64, value: 1, required: true, "data-test": "vm-vcpus" })),
        field("Disk 0 (GiB)", h("input", { name: "disk_gib", type: "number", min: 1, value: 1, required: true, "data-test": "vm-disk" })),
        [1, 2, 3].map((i) =>
          field(`Disk ${i} (GiB)`, h("input", { name: `disk${i}_gib`, type: "number", min: 1, placeholder: "none", "data-test": `vm-disk${i}-size` })),
        ),
        field("Owner", h("select", { name: "owner", "data-test": "vm-owner" }, h("option", { value: me.id }, me.name))),
        bootField("vm-boot"),
        diskBusField("vm-disk-bus"),
        field("CD-ROM", h("select", { name: "iso", "data-test": "vm-iso" }, h("option", { value: "" }, "empty"))),
        NIC_SLOTS.map((i) =>
          field(`Network card ${i}`, h("select", { name: `nic${i}`, "data-test": `vm-nic${i}` }, h("option", { value: "" }, "none"))),
        ),
        h(
          "label",
          { class: "check" },
          h("input", { type: "checkbox", name: "start", "data-test": "vm-start" }),
          "power on when created",
        ),
        submit,
      ),
      error,
    );
    let name = "";
    onSubmit(
      f,
      submit,
      error,
      async () => {
        name = value(f, "name");
        const { boot, boot_order } = bootChoice(f);
        const iso = value(f, "iso");
        const extra = [1, 2, 3].map((i) => value(f, `disk${i}_gib`)).filter((v) => v !== "").map(Number);
        const nets = NIC_SLOTS.map((i) => value(f, `nic${i}`)).filter((v) => v !== "");
        const appliance = value(f, "appliance");
        const disk0 = value(f, "disk_gib");
        const vm = await api<Vm>("POST", "/vms", {
          name,
          memory_mib: Number(value(f, "memory_mib")),
          vcpus: Number(value(f, "vcpus")),
          ...(disk0 !== "" ? { disk_gib: Number(disk0) } : {}),
          ...(appliance ? { appliance } : {}),
          ...(extra.length ? { extra_disks_gib: extra } : {}),
          owner: Number(value(f, "owner")),
          start: (f.elements.namedItem("start") as HTMLInputElement).checked,
          boot,
          ...(boot_order ? { boot_order } : {}),
          ...busChoice(f, boot),
          ...(iso ? { iso } : {}),
          ...(nets.length ? { networks: nets } : {}),
        });
        ctx.notify("info", `Created VM ${vm.id} (${vm.name})`);
        (f.elements.namedItem("name") as HTMLInputElement).value = "";
        for (const i of [1, 2, 3]) (f.elements.namedItem(`disk${i}_gib`) as HTMLInputElement).value = "";
        refresh();
      },
      (e) => `Could not create VM ${name}: ${message(e)}`,
    );
    return f;
  }

  async function act(vm: Vm, what: string, method: string, path: string, body?: unknown): Promise<void> {
    busy.add(vm.id);
    drawTable();
    try {
      await api(method, path, body);
      if (method === "DELETE") ctx.notify("info", `Deleted VM ${vm.id} (${vm.name})`);
    } catch (e) {
      ctx.notify("error", `Could not ${what} VM ${vm.id} (${vm.name}): ${message(e)}`);
    } finally {
      busy.delete(vm.id);
      if (confirming === vm.id) confirming = null;
      drawTable();
      refresh();
    }
  }

  function button(label: string, test: string, cls: string, onclick: () => void, disabled = false, title?: string): HTMLButtonElement {
    return h("button", { type: "button", class: cls, "data-test": test, disabled, title, onclick }, label);
  }

  function operations(vm: Vm): HTMLElement {
    const b = busy.has(vm.id);
    if (confirming === vm.id) {
      return h(
        "div",
        { class: "ops confirm", "data-test": "confirm-delete" },
        h("span", null, "Delete it and its disks?"),
        button("Yes, delete", "confirm-delete-yes", "danger", () => void act(vm, "delete", "DELETE", `/vms/${vm.id}`), b),
        button("Cancel", "confirm-delete-no", "", () => {
          confirming = null;
          drawTable();
        }),
      );
    }
    const power = (action: string) => () => void act(vm, action.replace("-", " "), "POST", `/vms/${vm.id}/power`, { action });
    const ops: HTMLElement[] = [];
    if (vm.power === "on") {
      ops.push(button("Power Off", "power-off", "", power("off"), b, "ask the guest to shut down; it is stopped hard if it does not"));
    } else if (vm.status === "stopping") {
      // Power Off asked the guest to shut down; the servers stop it hard only after a timeout.
      ops.push(button("Force Off", "force-off", "danger", power("force-off"), b, "stop it at once, without waiting for the guest to shut down"));
    } else {
      ops.push(button("Power On", "power-on", "good", power("on"), b));
    }
    ops.push(
      button(
        "Console",
        "console",
        "",
        () => ctx.navigate(`/console?vm=${vm.id}`),
        vm.status !== "running",
        vm.status === "running" ? "its screen and keyboard, and its serial console" : "power it on first",
      ),
    );
    const m = vm.migration;
    if (me.role === "manager" && m) {
      // A live migration gives up only while memory is still being copied.
      const can = !m.switched && !m.cancel_asked && (!m.progress || m.progress.phase === "copying");
      ops.push(
        button(
          "Cancel Migration",
          "migrate-cancel",
          "",
          () => void act(vm, "cancel the migration of", "POST", `/vms/${vm.id}/migrate/cancel`, {}),
          b || !can,
          can ? "give the migration up: the VM runs on where it is" : "too late: it is handing over",
        ),
      );
    } else if (me.role === "manager" && vm.backup) {
      // Moves the VM to its backup server; refused by the API until the backup is in sync.
      const ready = vm.replication.state === "in-sync" && !vm.backup.down;
      const how = "a running VM moves live, without a restart";
      ops.push(
        button(
          "Migrate",
          "migrate",
          "",
          () => void act(vm, "migrate", "POST", `/vms/${vm.id}/migrate`, {}),
          b || !ready,
          ready ? `move it to its backup server ${vm.backup.address} (${how})` : "its backup is not in sync yet",
        ),
      );
    }
    if (me.role !== "regular") {
      const stopped = vm.status === "stopped" && vm.power === "off";
      ops.push(
        button(
          "Delete",
          "delete",
          "danger",
          () => {
            confirming = vm.id;
            drawTable();
          },
          b || !stopped,
          stopped ? "delete this VM and its disks" : "power it off first: only a stopped VM is deleted",
        ),
      );
    }
    return h("div", { class: "ops" }, ops);
  }

  function detail(vm: Vm): HTMLElement {
    const item = (k: string, v: string, test: string) =>
      h("div", { class: "kv", "data-test": test }, h("span", { class: "k" }, k), h("span", { class: "v" }, v));
    const disks = Array.from({ length: DISK_SLOTS }, (_, i) =>
      item(`Disk${i}`, vm.disks[i] !== undefined ? bytes(vm.disks[i]) : "--", `vm-disk${i}`),
    );
    return h(
      "tr",
      { class: "detail", "data-test": "vm-detail", "data-vmid": vm.id },
      h(
        "td",
        { colspan: 7 },
        h(
          "div",
          { class: "kvs" },
          item("Memory", mib(vm.memory_mib), "vm-memory-size"),
          item("vCPUs", String(vm.vcpus), "vm-vcpu-count"),
          item(
            "Boots",
            vm.boot === "kernel"
              ? "guest system"
              : `${vm.boot.toUpperCase()}, ${vm.boot_order === "cdrom_first" ? "CD-ROM first" : "disk first"}, disks on ${vm.disk_bus === "sata" ? "SATA" : "virtio"}`,
            "vm-boot-mode",
          ),
          disks,
          cdromItem(vm),
          item(
            "MAC",
            vm.nics.length === 0 ? "no network card" : vm.nics.map((n) => `${n.mac} (${n.network})`).join(", "),
            "vm-mac",
          ),
          vm.error ? item("Not running", vm.error, "vm-error") : null,
          item("IP", ipText(vm), "vm-ip"),
          item("Disk generation", String(vm.replication.generation), "vm-generation"),
          backupItem(vm),
        ),
        me.role === "regular" ? null : cloneButton(vm),
        me.role === "regular" ? null : copyBackButton(vm),
        me.role === "regular" ? null : editForm(vm),
      ),
    );
  }

  // Change a powered-off VM: memory, vCPUs, how it boots, its disks grown, and new blank disks
  // up to Disk3.
  function editForm(vm: Vm): HTMLFormElement {
    const stopped = vm.status === "stopped" && vm.power === "off";
    const bootNow = vm.boot === "kernel" ? "kernel" : `${vm.boot}:${vm.boot_order}`;
    let f = editForms.get(vm.id);
    if (!f) {
      const error = h("div", { class: "form-error hidden", role: "alert", "data-test": "form-error" });
      const submit = h("button", { type: "submit", "data-test": "vm-edit-submit" }, "Change VM");
      const form = h(
        "form",
        { class: "ops edit", "data-test": "vm-edit" },
        field("Memory (MiB)", h("input", { name: "memory_mib", type: "number", min: 16, value: vm.memory_mib, required: true, "data-test": "vm-edit-memory" })),
        field("vCPUs", h("input", { name: "vcpus", type: "number", min: 1, max: 64, value: vm.vcpus, required: true, "data-test": "vm-edit-vcpus" })),
        bootField("vm-edit-boot"),
        diskBusField("vm-edit-disk-bus"),
        vm.disks.map((size, i) =>
          field(
            `Disk${i} (GiB)`,
            h("input", { name: `disk${i}_gib`, type: "number", min: Math.ceil(size / GIB), value: Math.ceil(size / GIB), required: true, title: "a disk grows, never shrinks", "data-test": `vm-edit-disk${i}` }),
          ),
        ),
        field("Add a disk (GiB)", h("input", { name: "add_gib", type: "number", min: 1, placeholder: "none", "data-test": "vm-edit-add-disk" })),
        submit,
        error,
      );
      (form.elements.namedItem("boot") as HTMLSelectElement).value = bootNow;
      (form.elements.namedItem("disk_bus") as HTMLSelectElement).value = vm.disk_bus;
      onSubmit(
        form,
        submit,
        error,
        async () => {
          const { boot, boot_order } = bootChoice(form);
          const add = value(form, "add_gib");
          const grow = vm.disks
            .map((_, disk) => ({ disk, gib: Number(value(form, `disk${disk}_gib`)) }))
            .filter((g) => g.gib > Math.ceil(vm.disks[g.disk] / GIB));
          const body: Record<string, unknown> = {
            memory_mib: Number(value(form, "memory_mib")),
            vcpus: Number(value(form, "vcpus")),
            boot,
            ...(boot_order ? { boot_order } : {}),
            ...busChoice(form, boot),
            ...(add ? { add_disks_gib: [Number(add)] } : {}),
            ...(grow.length ? { grow_disks: grow } : {}),
          };
          const changed = await api<Vm>("PATCH", `/vms/${vm.id}`, body);
          ctx.notify("info", `Changed VM ${changed.id} (${changed.name})`);
          editForms.delete(vm.id);
          refresh();
        },
        (e) => `Could not change VM ${vm.id} (${vm.name}): ${message(e)}`,
      );
      editForms.set(vm.id, form);
      f = form;
    }
    const submit = f.querySelector("[data-test=vm-edit-submit]") as HTMLButtonElement;
    submit.disabled = !stopped || busy.has(vm.id);
    submit.title = stopped ? "change this VM" : "power it off first: only a stopped VM is changed";
    return f;
  }

  // The CD-ROM drive: any ISO of the library, or empty; whoever operates the VM changes it.
  function cdromItem(vm: Vm): HTMLElement {
    const select = h(
      "select",
      { "data-test": "cdrom-select", "aria-label": `CD-ROM of VM ${vm.id}`, disabled: busy.has(vm.id) },
      h("option", { value: "" }, "(empty)"),
      isos.map((i) => h("option", { value: i.name }, i.name)),
    );
    select.value = vm.cdrom ?? "";
    select.addEventListener("change", () => {
      const iso = select.value || null;
      void act(vm, iso ? `insert ${iso} into the CD-ROM of` : "eject the CD-ROM of", "POST", `/vms/${vm.id}/cdrom`, { iso });
    });
    return h(
      "div",
      { class: "kv wide", "data-test": "vm-cdrom" },
      h("span", { class: "k" }, "CD-ROM"),
      h(
        "span",
        { class: "v" },
        select,
        vm.cdrom ? button("Eject", "cdrom-eject", "", () => void act(vm, "eject the CD-ROM of", "POST", `/vms/${vm.id}/cdrom`, { iso: null }), busy.has(vm.id)) : null,
      ),
    );
  }

  // Clone VM, as the 2008 product had it in the detail row: a powered-off VM only (its disk
  // is copied as it is); the new VM is the caller's own.
  function cloneButton(vm: Vm): HTMLElement {
    const stopped = vm.status === "stopped" && vm.power === "off";
    return h(
      "div",
      { class: "ops" },
      button(
        "Clone VM",
        "clone",
        "",
        () => {
          const name = window.prompt(`Name of the copy of ${vm.name}:`, `${vm.name}-copy`);
          if (name) void act(vm, "clone", "POST", `/vms/${vm.id}/clone`, { name });
        },
        busy.has(vm.id) || !stopped,
        stopped ? "a new VM with a copy of this one's disk" : "power it off first: only a stopped VM is cloned",
      ),
    );
  }

  // Live backup, as the 2008 product had it: the VM, running or not, into a new appliance
  // (its company's), taken from its backup copies; its latest task's progress beside it.
  function backupItem(vm: Vm): HTMLElement {
    const t = tasks.find((x) => x.vm === vm.id);
    const inSync = vm.replication.state === "in-sync";
    const running = t?.state === "running";
    const shown = t
      ? t.state === "running"
        ? `${t.what}: ${t.percent}%`
        : t.state === "done"
          ? `${t.appliance}: done ${t.ended_ms ? time(t.ended_ms) : ""}`
          : `${t.appliance}: failed: ${t.reason ?? ""}`
      : "none yet";
    return h(
      "div",
      { class: "kv", "data-test": "vm-live-backup" },
      h("span", { class: "k" }, "Backup"),
      h(
        "span",
        { class: "v" },
        h("span", { "data-test": "vm-backup-state", "data-state": t?.state ?? "none" }, shown),
        " ",
        button(
          "Back up now",
          "backup",
          "",
          () => {
            busy.add(vm.id);
            drawTable();
            api<Task>("POST", `/vms/${vm.id}/backup`, {})
              .then((x) => ctx.notify("info", `Backing VM ${vm.id} (${vm.name}) up into appliance ${x.appliance}: task ${x.id}`))
              .catch((e) => ctx.notify("error", `Could not back VM ${vm.id} (${vm.name}) up: ${message(e)}`))
              .finally(() => {
                busy.delete(vm.id);
                drawTable();
                refresh();
              });
          },
          busy.has(vm.id) || running || !inSync,
          inSync ? "a crash-consistent copy of its disks now, into a new appliance, while it runs" : "its backup copies are not in sync yet",
        ),
        scheduleControl(vm),
      ),
    );
  }

  /** A VM's backup schedule: every N hours, the newest K kept; set or ended here. */
  function scheduleControl(vm: Vm): HTMLElement {
    const s = vm.backup_schedule;
    const every = h("input", { type: "number", min: 1, max: 8760, value: s?.every_hours ?? 24, "data-test": "backup-every", title: "hours between backups" });
    const keep = h("input", { type: "number", min: 1, max: 100, value: s?.keep ?? 7, "data-test": "backup-keep", title: "backups kept" });
    const set = (schedule: unknown) => {
      busy.add(vm.id);
      api("POST", `/vms/${vm.id}/backup-schedule`, { schedule })
        .then(() => ctx.notify("info", schedule ? `VM ${vm.id} (${vm.name}) is backed up on a schedule` : `VM ${vm.id} (${vm.name}): no more scheduled backups`))
        .catch((e) => ctx.notify("error", `Could not change the backup schedule of VM ${vm.id} (${vm.name}): ${message(e)}`))
        .finally(() => {
          busy.delete(vm.id);
          refresh();
        });
    };
    return h(
      "div",
      { class: "schedule", "data-test": "backup-schedule", "data-on": s ? "yes" : "no" },
      s ? `every ${s.every_hours} h, ${s.keep} kept` : "not on a schedule",
      vm.backup_held ? h("div", { class: "form-error", "data-test": "backup-held" }, `The next backup waits: ${vm.backup_held}`) : null,
      h("div", { class: "row" },
        "every ", every, " h, keep ", keep, " ",
        button("Schedule", "backup-schedule-set", "", () => set({ every_hours: Number(every.value), keep: Number(keep.value) }), busy.has(vm.id)),
        s ? button("Stop", "backup-schedule-stop", "", () => set(null), busy.has(vm.id)) : null,
      ),
    );
  }

  // Copy back, as the 2008 product had it: a powered-off VM becomes a new appliance of the
  // library (its company's), a task whose progress the Library Mgmt page shows.
  function copyBackButton(vm: Vm): HTMLElement {
    const stopped = vm.status === "stopped" && vm.power === "off";
    return h(
      "div",
      { class: "ops" },
      button(
        "Copy back",
        "copy-back",
        "",
        () => {
          const name = window.prompt(`Name of the appliance ${vm.name} becomes:`, `${vm.name}-appliance`);
          if (!name) return;
          busy.add(vm.id);
          drawTable();
          api<{ id: number }>("POST", `/vms/${vm.id}/copy-back`, { name })
            .then((t) => ctx.notify("info", `Copying VM ${vm.id} (${vm.name}) back into appliance ${name}: task ${t.id}`))
            .catch((e) => ctx.notify("error", `Could not copy VM ${vm.id} (${vm.name}) back: ${message(e)}`))
            .finally(() => {
              busy.delete(vm.id);
              drawTable();
              refresh();
            });
        },
        busy.has(vm.id) || !stopped,
        stopped ? "a new appliance of the library with this VM's disks as they are" : "power it off first: only a stopped VM is copied back",
      ),
    );
  }

  function drawTable(): void {
    if (vms.length === 0) {
      fill(
        table,
        h("p", { class: "empty", "data-test": "vms-empty" }, creates ? "No virtual machines yet: create one above." : "You own no virtual machine yet: your Power User creates it."),
      );
      return;
    }
    const rows: HTMLElement[] = [];
    for (const vm of vms) {
      const open = expanded.has(vm.id);
      const toggle = h(
        "button",
        { type: "button", class: "link", "data-test": "vm-details-toggle", "aria-expanded": String(open), title: open ? "hide details" : "show details" },
        h("span", { class: "caret" }, open ? "▾" : "▸"),
        h("span", { "data-test": "vm-name" }, vm.name),
      );
      toggle.addEventListener("click", () => {
        if (expanded.has(vm.id)) expanded.delete(vm.id);
        else expanded.add(vm.id);
        drawTable();
      });
      rows.push(
        h(
          "tr",
          { "data-test": "vm-row", "data-vmid": vm.id, "data-name": vm.name, "data-status": vm.status, class: open ? "open" : "" },
          h("td", { class: "num", "data-test": "vm-id" }, String(vm.id)),
          h("td", null, toggle, h("span", { class: "muted", "data-test": "vm-owner-name" }, ` (${vm.owner_name ?? "nobody"})`)),
          h("td", null, operations(vm)),
          h("td", null, status(vm.status), vm.migration ? migrationLine(vm.migration) : null),
          h("td", { "data-test": "vm-primary" }, copyPlace(vm.primary, "--")),
          h("td", { "data-test": "vm-backup" }, copyPlace(vm.backup, "No Backup VMM")),
          h("td", null, replication(vm.replication)),
        ),
      );
      if (open) rows.push(detail(vm));
    }
    fill(
      table,
      h(
        "table",
        { class: "grid vms", "data-test": "vms-table" },
        h(
          "thead",
          null,
          h("tr", null, ["VMID", "Name (owner)", "Operations", "Status", "Primary VMM", "Backup VMM", "Replication"].map((t) => h("th", null, t))),
        ),
        h("tbody", null, rows),
      ),
    );
  }
}

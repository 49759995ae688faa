// How values read on screen: roles, sizes, where a copy lives, replication and power states.

import { h } from "./dom";
import type { Copy, Migration, Replication, Role, VmStatus } from "./types";

export const ROLE_NAMES: Record<Role, string> = {
  manager: "Manager",
  power_user: "Power User",
  regular: "Regular User",
};

export const GIB = 1024 * 1024 * 1024;
const MIB = 1024 * 1024;

/** A size in bytes: whole GiB as "8 GiB", else MiB (KiB or bytes when smaller). */
export function bytes(n: number): string {
  if (n >= GIB && n % GIB === 0) return `${n / GIB} GiB`;
  if (n >= MIB) return `${Math.round(n / MIB)} MiB`;
  if (n >= 1024) return `${Math.round(n / 1024)} KiB`;
  return `${Math.round(n)} bytes`;
}

/** A size in MiB: "512 MiB", "2 GiB" when whole. */
export function mib(n: number): string {
  return n >= 1024 && n % 1024 === 0 ? `${n / 1024} GiB` : `${n} MiB`;
}

/** A storage pool's name: its path, or the server's default pool (path ""). */
export function pool(path: string): string {
  return path === "" ? "default pool" : path;
}

/** "address:pool", as the white paper's "192.168.1.162:/vms1" (a Manager's view); "server N"
 * for the others, who see no server addresses. */
export function copyPlace(c: Copy | null, none: string): HTMLElement {
  if (!c) return h("span", { class: "muted" }, none);
  const where =
    c.address === undefined || c.pool === undefined
      ? `server ${c.server}`
      : c.pool === ""
        ? [c.address, h("span", { class: "muted" }, ` (${pool(c.pool)})`)]
        : `${c.address}:${c.pool}`;
  return h(
    "span",
    { class: c.down ? "place down" : "place", "data-server": String(c.server) },
    where,
    c.down ? h("span", { class: "badge bad" }, "down") : null,
  );
}

/** "in sync", "resyncing 42%", "degraded" or "unknown", coloured. */
export function replication(r: Replication): HTMLElement {
  switch (r.state) {
    case "in-sync":
      return h("span", { class: "badge good", "data-test": "replication" }, "in sync");
    case "resyncing":
      // Rounded down: 100% is shown only once the copy is in sync.
      return h(
        "span",
        { class: "badge warn", "data-test": "replication" },
        `resyncing ${Math.floor(r.percent ?? 0)}%`,
      );
    case "degraded":
      return h(
        "span",
        { class: "badge bad", "data-test": "replication", title: "one copy only: no usable backup" },
        "degraded",
      );
    default:
      return h("span", { class: "badge", "data-test": "replication" }, "unknown");
  }
}

const STATUS_CLASS: Record<VmStatus, string> = {
  running: "good",
  starting: "warn",
  stopping: "warn",
  stopped: "off",
};

/** A VM's power state as a badge. */
export function status(s: VmStatus): HTMLElement {
  return h("span", { class: `badge ${STATUS_CLASS[s] ?? ""}`, "data-test": "vm-status" }, s);
}

/** A live migration's progress, in a line: where to, how far, what it would pause now. */
export function migrationLine(m: Migration): HTMLElement {
  const p = m.progress;
  let text = `moving live to server ${m.to}`;
  if (m.switched) text += ": handing over";
  else if (m.copying_disks) text += ": its disks' new copies there syncing first";
  else if (p) {
    const pct = p.memory_bytes > 0 ? Math.min(100, Math.floor((p.covered_bytes * 100) / p.memory_bytes)) : 0;
    text +=
      p.round === 0
        ? `: ${pct}% of memory copied (${bytes(p.transferred_bytes)} sent)`
        : `: round ${p.round}, ${bytes(p.remaining_bytes)} left, dirtied at ${bytes(p.dirty_rate_bytes_per_sec)}/s, pause ~${p.expected_downtime_ms} ms`;
    if (p.throttle_pct > 0) text += `, guest slowed ${p.throttle_pct}%`;
    if (p.phase !== "copying") text += ` (${p.phase})`;
  }
  if (m.cancel_asked) text += ", cancelling";
  return h("div", { class: "muted", "data-test": "vm-migration" }, text);
}

/** A time in ms since the epoch, local. */
export function time(ms: number): string {
  const d = new Date(ms);
  const p = (n: number) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
}

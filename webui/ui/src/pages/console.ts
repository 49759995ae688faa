// A VM's consoles, at /console?vm=ID&kind=vnc|serial: the graphical console (noVNC on the
// RFB stream) and the serial console (xterm.js), each a WebSocket to the API, which relays it
// from the server the VM runs on. The socket closes when the user leaves the page.

import RFB from "@novnc/novnc";
import { FitAddon } from "@xterm/addon-fit";
import { Terminal } from "@xterm/xterm";
import "@xterm/xterm/css/xterm.css";

import { api, message } from "../api";
import { fill, h } from "../dom";
import { status } from "../format";
import type { PageContext } from "../page";
import type { Vm } from "../types";

type Kind = "vnc" | "serial";

/** The console WebSocket of VM `id`, on this page's own server. */
function consoleUrl(id: number, kind: Kind): string {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  return `${scheme}://${location.host}/api/v1/vms/${id}/console/${kind}`;
}

/** Why a console could not open: the API says it on a plain GET (the WebSocket cannot). */
async function whyRefused(id: number, kind: Kind): Promise<string> {
  try {
    const r = await fetch(`/api/v1/vms/${id}/console/${kind}`, { credentials: "same-origin", cache: "no-store" });
    const body = (await r.json()) as { error?: string };
    // 426 means the checks passed and only the upgrade was missing: the relay itself failed.
    if (r.status === 426) return "the connection to the VM's server was lost";
    return body.error ?? `HTTP ${r.status}`;
  } catch (e) {
    return message(e);
  }
}

export function consolePage(ctx: PageContext): void {
  const params = new URLSearchParams(location.search);
  const id = Number(params.get("vm"));
  let kind: Kind = params.get("kind") === "serial" ? "serial" : "vnc";
  /** Closes the open console, if any. */
  let close: (() => void) | null = null;
  let vm: Vm | null = null;
  /** Which connection is current: callbacks of an older one are ignored. */
  let generation = 0;
  let left = false;
  let retryTimer = 0;

  const title = h("h1", { "data-test": "console-title" }, `Console of VM ${id}`);
  const state = h("span", { class: "console-state", "data-test": "console-state", "data-state": "connecting" }, "connecting");
  const vmStatus = h("span", { "data-test": "console-vm-status" });
  const screen = h("div", { class: "console-screen", "data-test": "console-screen" });
  const tab = (k: Kind, label: string) =>
    h("button", { type: "button", class: "tab-button", "data-test": `console-${k}`, onclick: () => switchTo(k) }, label);
  const vncTab = tab("vnc", "Graphical console");
  const serialTab = tab("serial", "Serial console");
  const cad = h(
    "button",
    { type: "button", "data-test": "console-cad", title: "send Ctrl-Alt-Del to the guest" },
    "Ctrl-Alt-Del",
  );
  const reconnect = h("button", { type: "button", "data-test": "console-reconnect", onclick: () => open() }, "Reconnect");
  const back = h("button", { type: "button", class: "link", "data-test": "console-back", onclick: () => ctx.navigate("/vms") }, "← Virtual Machines");

  fill(
    ctx.main,
    back,
    title,
    h("div", { class: "console-bar" }, vncTab, serialTab, cad, reconnect, h("span", { class: "muted" }, "VM: "), vmStatus, h("span", { class: "muted" }, " console: "), state),
    screen,
  );
  ctx.onLeave(() => {
    left = true;
    window.clearTimeout(retryTimer);
    close?.();
  });

  if (!Number.isInteger(id) || id <= 0) {
    setState("failed", "no VM given: open a console from the Virtual Machines page");
    return;
  }

  ctx.poll(async () => {
    const v = await api<Vm>("GET", `/vms/${id}`);
    const was = vm?.status;
    vm = v;
    fill(title, `Console of VM ${v.id} (${v.name})`);
    fill(vmStatus, status(v.status));
    // The VM came up (or moved to its backup and restarted): connect again.
    if (v.status === "running" && was !== undefined && was !== "running" && state.dataset.state !== "connected") open();
  });

  function setState(s: "connecting" | "connected" | "closed" | "failed", text: string): void {
    state.dataset.state = s;
    state.className = `console-state ${s}`;
    fill(state, text);
  }

  function switchTo(k: Kind): void {
    if (k === kind && close) return;
    kind = k;
    history.replaceState(null, "", `/console?vm=${id}&kind=${k}`);
    open();
  }

  function open(): void {
    window.clearTimeout(retryTimer);
    generation += 1;
    close?.();
    close = null;
    vncTab.classList.toggle("active", kind === "vnc");
    serialTab.classList.toggle("active", kind === "serial");
    cad.classList.toggle("hidden", kind !== "vnc");
    screen.dataset.kind = kind;
    fill(screen);
    setState("connecting", "connecting");
    if (kind === "vnc") openVnc();
    else openSerial();
  }

  /** Connection `gen` ended. While the VM should run (it may be restarting on its backup
   * server after a failover or a migration), it is tried again every 3 s. */
  async function closed(clean: boolean, gen: number): Promise<void> {
    if (left || gen !== generation) return;
    const again = vm?.power === "on";
    const why = clean ? "closed" : `not connected: ${await whyRefused(id, kind)}`;
    if (left || gen !== generation) return;
    setState(clean ? "closed" : "failed", again ? `${why}; trying again` : why);
    if (again) {
      retryTimer = window.setTimeout(() => {
        if (!left && gen === generation) open();
      }, 3000);
    }
  }

  function openVnc(): void {
    const gen = generation;
    const target = h("div", { class: "vnc", "data-test": "vnc-screen" });
    screen.appendChild(target);
    let rfb: RFB;
    try {
      rfb = new RFB(target, consoleUrl(id, "vnc"), { wsProtocols: ["binary"] });
    } catch (e) {
      setState("failed", `cannot open the graphical console: ${message(e)}`);
      return;
    }
    rfb.scaleViewport = true;
    rfb.focusOnClick = true;
    let connected = false;
    rfb.addEventListener("connect", () => {
      connected = true;
      setState("connected", "connected");
      rfb.focus();
    });
    rfb.addEventListener("disconnect", (e: CustomEvent<{ clean: boolean }>) => {
      void closed(connected && e.detail.clean, gen);
    });
    rfb.addEventListener("securityfailure", (e: CustomEvent<{ reason?: string }>) => {
      setState("failed", `refused by the VM's console: ${e.detail.reason ?? "security failure"}`);
    });
    cad.onclick = () => rfb.sendCtrlAltDel();
    close = () => {
      connected = false;
      rfb.disconnect();
    };
  }

  function openSerial(): void {
    const gen = generation;
    const target = h("div", { class: "serial", "data-test": "serial-terminal" });
    screen.appendChild(target);
    // convertEol: a bare "\n" starts a new line too (Linux's serial output has "\r\n" anyway).
    const term = new Terminal({ convertEol: true, scrollback: 5000, cursorBlink: true, fontSize: 14 });
    const fit = new FitAddon();
    term.loadAddon(fit);
    term.open(target);
    fit.fit();
    const resized = () => fit.fit();
    window.addEventListener("resize", resized);
    const ws = new WebSocket(consoleUrl(id, "serial"));
    ws.binaryType = "arraybuffer";
    const encoder = new TextEncoder();
    let connected = false;
    ws.onopen = () => {
      connected = true;
      setState("connected", "connected");
      term.focus();
    };
    ws.onmessage = (e: MessageEvent<ArrayBuffer>) => term.write(new Uint8Array(e.data));
    ws.onclose = (e) => void closed(connected && e.wasClean, gen);
    const typed = term.onData((d) => {
      if (ws.readyState === WebSocket.OPEN) ws.send(encoder.encode(d));
    });
    close = () => {
      connected = false;
      window.removeEventListener("resize", resized);
      typed.dispose();
      ws.close();
      term.dispose();
    };
  }

  open();
}

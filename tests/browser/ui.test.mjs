// EnSpeed's web UI in a real browser (Debian's Chromium, driven by playwright-core) against a
// real cluster: a Manager, a Power User and a Regular User each in their own browser context,
// each on a different server's UI. tests/tests/browser.rs starts the cluster and runs this.
//
// Environment:
//   ENSPEED_WEB               the servers' base URLs, comma-separated (http://127.0.0.1:PORT)
//   ENSPEED_MANAGER_PASSWORD  the first Manager's password
//   ENSPEED_MANAGER           its name (admin)
//   ENSPEED_ARTIFACTS         where screenshots go (default: the Cargo target dir's ui-screenshots)
//   ENSPEED_CHROMIUM          the browser (/usr/bin/chromium)

import assert from "node:assert/strict";
import { mkdirSync, readdirSync, rmSync } from "node:fs";
import { homedir } from "node:os";
import path from "node:path";
import { chromium } from "playwright-core";

const bases = (process.env.ENSPEED_WEB ?? "")
  .split(",")
  .map((s) => s.trim().replace(/\/+$/, ""))
  .filter(Boolean);
const managerName = process.env.ENSPEED_MANAGER ?? "admin";
const managerPassword = process.env.ENSPEED_MANAGER_PASSWORD ?? "";
// A server started with --await-join, and its token.
const newServer = process.env.ENSPEED_NEW_SERVER ?? "";
const newServerToken = process.env.ENSPEED_NEW_SERVER_TOKEN ?? "";
// A bootable CD (El Torito) whose program sets a 1024x768 VBE mode and draws colour bars.
const barsIso = process.env.ENSPEED_BARS_ISO ?? "";
// An installer CD (El Torito): it writes a system onto the first hard disk and powers off; the
// installed system counts on the BIOS clock ("TICK nnnn", white on blue, top left of its text
// screen and on its serial console).
const installerIso = process.env.ENSPEED_INSTALLER_ISO ?? "";
// An OVA whose disk (a stream-optimized VMDK) a BIOS boots; its program powers the VM off.
const ova = process.env.ENSPEED_OVA ?? "";
/** An appliance directory's catalogue URL (it offers the same OVA as "from-directory"). */
const directory = process.env.ENSPEED_DIRECTORY ?? "";
if (bases.length === 0 || !managerPassword) {
  console.error("ui.test.mjs: set ENSPEED_WEB (base URLs, comma-separated) and ENSPEED_MANAGER_PASSWORD");
  process.exit(2);
}
const targetDir = process.env.CARGO_TARGET_DIR ?? path.join(homedir(), ".cache/enspeed/target");
const artifacts = path.resolve(process.env.ENSPEED_ARTIFACTS ?? path.join(targetDir, "ui-screenshots"));
mkdirSync(artifacts, { recursive: true });
// This run's screenshots only.
for (const f of readdirSync(artifacts)) if (f.endsWith(".png")) rmSync(path.join(artifacts, f));
console.log(`screenshots go to ${artifacts}`);

/** Distinct names per run, so a rerun against the same cluster works. */
const tag = Date.now().toString(36).slice(-5);
const POWER = `acme-${tag}`;
const REGULAR = `alice-${tag}`;
const VM = `web-${tag}`;
const ISO = `install-${tag}.iso`;
const BARS = `bars-${tag}.iso`;
const BLANK = `blank-${tag}`;
const INSTALLER = `installer-${tag}.iso`;
const INSTALLED = `installed-${tag}`;
const APP = `bootdisk-${tag}`;
const APPVM = `fromapp-${tag}`;
const TPL = `tpl-${tag}`;
const PASSWORD = "user-secret-1";
const NEW_PASSWORD = "user-secret-2";

const started = Date.now();
let shots = 0;
const problems = [];

function step(text) {
  console.log(`[${((Date.now() - started) / 1000).toFixed(1)} s] ${text}`);
}

async function shot(page, name) {
  const file = path.join(artifacts, `${String(++shots).padStart(2, "0")}-${name}.png`);
  await page.screenshot({ path: file, fullPage: true });
  console.log(`  screenshot ${file}`);
}

/** Polls `probe` until it answers a truthy value; fails with `what` and the last value. */
async function until(what, probe, timeoutMs = 20000) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      last = await probe();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what} (last: ${last})`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

/** What the user reads in `locator`, blanks folded. */
async function text(locator) {
  return (await locator.innerText({ timeout: 2000 })).replace(/\s+/g, " ").trim();
}

async function tabs(page) {
  return (await page.locator("[data-test=tabs] a").allTextContents()).map((t) => t.trim());
}

/** A fresh browser context (its own cookies) with a page that records its errors. */
async function newPage(browser, who) {
  const context = await browser.newContext({ viewport: { width: 1360, height: 860 } });
  const page = await context.newPage();
  page.on("pageerror", (e) => problems.push(`${who}: page error: ${e.message}`));
  page.on("console", (m) => {
    // The browser logs each 4xx answer it was given; those the UI handles on purpose.
    if (m.type() === "error" && !m.text().startsWith("Failed to load resource")) problems.push(`${who}: console: ${m.text()}`);
  });
  return page;
}

async function login(page, base, name, password) {
  const r = await page.goto(`${base}/`);
  assert.equal(r.status(), 200);
  await page.waitForSelector("[data-test=login-form]");
  assert.equal(new URL(page.url()).pathname, "/login", "a visitor is sent to the login page");
  await page.fill("[data-test=login-name]", name);
  await page.fill("[data-test=login-password]", password);
  await page.click("[data-test=login-submit]");
  await page.waitForSelector("[data-test=header]:not(.hidden)");
  assert.equal(await text(page.locator("[data-test=logout]")), `logout (${name})`);
}

async function openTab(page, tab) {
  await page.click(`[data-test=tab-${tab}]`);
  await page.waitForSelector(`[data-test=page][data-page=${tab}]`);
}

async function fillForm(page, form, fields) {
  for (const [test, value] of Object.entries(fields)) {
    const el = page.locator(`[data-test=${form}] [data-test=${test}]`);
    if ((await el.evaluate((e) => e.tagName)) === "SELECT") await el.selectOption(String(value));
    else await el.fill(String(value));
  }
}

function vmRow(page, name) {
  return page.locator(`[data-test=vm-row][data-name="${name}"]`);
}

function userRow(page, name) {
  return page.locator(`[data-test=user-row][data-user="${name}"]`);
}

const browser = await chromium.launch({
  executablePath: process.env.ENSPEED_CHROMIUM ?? "/usr/bin/chromium",
  headless: true,
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
step(`Chromium ${browser.version()}; servers ${bases.join(" ")}`);
const at = (i) => bases[i % bases.length];

try {
  // ---- The Manager, on the first server.
  const m = await newPage(browser, "manager");
  step("the login page, served with a Content-Security-Policy");
  const index = await m.goto(`${at(0)}/vms`);
  const csp = index.headers()["content-security-policy"] ?? "";
  assert.match(csp, /default-src 'self'/, `CSP: ${csp}`);
  assert.match(csp, /frame-ancestors 'none'/, `CSP: ${csp}`);
  await m.waitForSelector("[data-test=login-form]");
  assert.equal(await text(m.locator("[data-test=login-logo]")), "EnSpeed");
  await shot(m, "login");

  step("a wrong password is refused with the API's message");
  await m.fill("[data-test=login-name]", `nobody-${tag}`);
  await m.fill("[data-test=login-password]", "not-the-password");
  await m.click("[data-test=login-submit]");
  await m.waitForSelector("[data-test=login-error]:not(.hidden)");
  assert.match(await text(m.locator("[data-test=login-error]")), /wrong name or password/);
  await shot(m, "login-refused");

  step("the Manager logs in and sees the cluster's health");
  await login(m, at(0), managerName, managerPassword);
  assert.deepEqual(await tabs(m), ["Summary", "VM Servers", "Virtual Machines", "Library Mgmt", "Networks", "Users", "Audit"]);
  await until("the servers card", async () => /3 of 3 up/.test(await text(m.locator("[data-test=summary-servers]"))));
  await until("a Raft leader", async () => /server \d/.test(await text(m.locator("[data-test=summary-leader]"))));
  await shot(m, "manager-summary");

  step("VM Servers: three servers, one leader, one witness");
  await openTab(m, "servers");
  await until("three server rows", async () => (await m.locator("[data-test=server-row]").count()) === 3);
  assert.equal(await m.locator("[data-test=server-leader]").count(), 1);
  assert.match(await text(m.locator("[data-test=servers-table]")), /witness/);
  assert.equal(await text(m.locator("[data-test=join-token]")), "T", "the join token is not shown unasked");
  await m.click("[data-test=join-token-show]");
  await until("the cluster's join token shown", async () => /^K1\.[0-9a-f]+\.[0-9a-f]+$/.test(await text(m.locator("[data-test=join-token]"))));
  await shot(m, "manager-servers");

  step("Library Mgmt: the Manager uploads an ISO image, with its progress, resumed after the network fails under it; both VM servers get a copy");
  await openTab(m, "library");
  await m.waitForSelector("[data-test=isos-empty]");
  await m.setInputFiles("[data-test=iso-file]", { name: "installer disc.iso", mimeType: "application/x-iso9660-image", buffer: Buffer.alloc(6 << 20, 0x41) });
  assert.equal(await m.inputValue("[data-test=iso-name]"), "installer_disc.iso", "the name comes from the file");
  await m.fill("[data-test=iso-name]", ISO);
  // The upload's first part never reaches the server, as if the network failed.
  let cut = 0;
  await m.route("**/api/v1/uploads/*", (route) => {
    if (route.request().method() === "PATCH" && cut++ === 0) return route.abort("connectionreset");
    return route.continue();
  });
  await m.click("[data-test=iso-upload]");
  await until("the upload done", async () => /Uploaded/.test(await text(m.locator("[data-test=iso-progress-text]"))), 60000);
  assert.equal(cut, 2, "one part cut, then sent again whole");
  await m.unroute("**/api/v1/uploads/*");
  await until("the ISO on both VM servers", async () => (await text(m.locator(`[data-test=iso-row][data-name="${ISO}"] [data-test=iso-ready]`))) === "2 of 2 VM servers", 60000);
  assert.match(await text(m.locator(`[data-test=iso-row][data-name="${ISO}"]`)), /6 MiB/);
  await shot(m, "manager-library");
  await m.click("[data-test=iso-upload]");
  await until("a second upload without a file is refused", async () => !(await m.locator("[data-test=iso-error]").evaluate((e) => e.classList.contains("hidden"))) || (await m.locator("[data-test=iso-file]:invalid").count()) === 1);

  step("Networks: the Manager defines one and sees it; a second on its bridge is refused; it deletes it");
  await openTab(m, "networks");
  await m.waitForSelector("[data-test=networks-empty]");
  await m.fill("[data-test=network-name]", "lan");
  await m.fill("[data-test=network-bridge]", "br-uitest");
  await m.fill("[data-test=network-vlan]", "10");
  await m.fill("[data-test=network-subnet]", "10.30.0.0/24");
  await m.click("[data-test=network-create]");
  const lan = m.locator('[data-test=network-row][data-name="lan"]');
  await until("the network listed", async () => (await lan.count()) === 1);
  assert.match(await text(lan), /br-uitest[\s\S]*10[\s\S]*10\.30\.0\.0\/24[\s\S]*every tenant/);
  await m.fill("[data-test=network-name]", "lan2");
  await m.fill("[data-test=network-bridge]", "br-uitest");
  await m.click("[data-test=network-create]");
  await until("the second refused", async () => /network lan's/.test(await text(m.locator("[data-test=network-error]"))));
  await shot(m, "manager-networks");
  await lan.locator("[data-test=network-delete]").click();
  await m.waitForSelector("[data-test=networks-empty]");
  step("it defines it again, with DHCP: a gateway and DNS servers; the VMs below are on it");
  await m.fill("[data-test=network-name]", "lan");
  await m.fill("[data-test=network-bridge]", "br-uitest");
  await m.fill("[data-test=network-subnet]", "10.30.0.0/24");
  await m.fill("[data-test=network-gateway]", "10.30.0.254");
  await m.fill("[data-test=network-dns]", "10.30.0.53 10.30.0.54");
  await m.click("[data-test=network-create]");
  await until("the network listed again", async () => (await lan.count()) === 1);
  assert.match(await text(lan), /10\.30\.0\.0\/24 \(DHCP\)[\s\S]*10\.30\.0\.254, 10\.30\.0\.53, 10\.30\.0\.54/);

  step(`the Manager creates the Power User ${POWER} with a quota`);
  await openTab(m, "users");
  await m.selectOption("[data-test=user-create] [data-test=user-role]", "power_user");
  await m.waitForSelector("[data-test=user-create] [data-test=quota-vms]", { state: "visible" });
  await fillForm(m, "user-create", {
    "user-name": POWER,
    "user-password": PASSWORD,
    "quota-vms": 3,
    "quota-memory": 1024,
    "quota-disk": 10,
  });
  await m.click("[data-test=user-create-submit]");
  await until(`${POWER} in the table`, async () => (await userRow(m, POWER).count()) === 1);
  assert.equal(await text(userRow(m, POWER).locator("[data-test=user-role-name]")), "Power User");
  assert.match(await text(userRow(m, POWER).locator("[data-test=user-quota]")), /^0\/3 VMs · 0 MiB\/1 GiB · 0\/10 GiB disk$/);

  step("creating the same user again shows the API's error");
  await fillForm(m, "user-create", { "user-name": POWER, "user-password": PASSWORD });
  await m.click("[data-test=user-create-submit]");
  await m.waitForSelector("[data-test=user-create] [data-test=form-error]:not(.hidden)");
  assert.match(await text(m.locator("[data-test=user-create] [data-test=form-error]")), new RegExp(`user ${POWER} exists`));
  await shot(m, "manager-users");

  // ---- The Power User, on the second server.
  const p = await newPage(browser, "power user");
  step(`the Power User ${POWER} logs in (server 2): no VM Servers or Audit`);
  await login(p, at(1), POWER, PASSWORD);
  assert.deepEqual(await tabs(p), ["Summary", "Virtual Machines", "Users"]);

  step(`it creates the Regular User ${REGULAR}`);
  await openTab(p, "users");
  assert.equal(await p.locator("[data-test=user-create] [data-test=user-role]").count(), 0, "a Power User creates Regular Users only");
  await fillForm(p, "user-create", { "user-name": REGULAR, "user-password": PASSWORD });
  await p.click("[data-test=user-create-submit]");
  await until(`${REGULAR} in the table`, async () => (await userRow(p, REGULAR).count()) === 1);
  assert.equal(await text(userRow(p, REGULAR).locator("[data-test=user-role-name]")), "Regular User");
  await shot(p, "power-user-users");

  step("a VM over the quota is refused, and the UI says why");
  await openTab(p, "vms");
  await until("the owner list", async () => (await p.locator(`[data-test=vm-owner] option`).count()) >= 2);
  await fillForm(p, "vm-create", { "vm-name": `${VM}-big`, "vm-memory": 4096, "vm-vcpus": 1, "vm-disk": 1 });
  await p.click("[data-test=vm-create-submit]");
  await p.waitForSelector("[data-test=vm-create] [data-test=form-error]:not(.hidden)");
  assert.match(await text(p.locator("[data-test=vm-create] [data-test=form-error]")), /quota/);
  await shot(p, "power-user-quota-refused");

  step(`it creates the VM ${VM} owned by ${REGULAR}`);
  const owner = await p.locator("[data-test=vm-owner] option", { hasText: REGULAR }).getAttribute("value");
  await until("the network among the new VM's choices", async () => (await p.locator('[data-test=vm-nic0] option[value="lan"]').count()) === 1);
  await fillForm(p, "vm-create", { "vm-name": VM, "vm-memory": 128, "vm-vcpus": 1, "vm-disk": 1, "vm-owner": owner, "vm-boot": "kernel", "vm-nic0": "lan" });
  await p.click("[data-test=vm-create-submit]");
  await until(`${VM} in the table`, async () => (await vmRow(p, VM).count()) === 1);
  assert.match(await text(vmRow(p, VM).locator("[data-test=vm-owner-name]")), new RegExp(`\\(${REGULAR}\\)`));
  assert.equal(await text(vmRow(p, VM).locator("[data-test=vm-status]")), "stopped");
  await until("the quota in use", async () => /1 of 3 VMs/.test(await text(p.locator("[data-test=quota]"))));
  await shot(p, "power-user-vms");

  // ---- The Regular User, on the third server.
  const r = await newPage(browser, "regular user");
  step(`the Regular User ${REGULAR} logs in (server 3): Summary and Virtual Machines only`);
  await login(r, at(2), REGULAR, PASSWORD);
  assert.deepEqual(await tabs(r), ["Summary", "Virtual Machines"]);
  for (const t of ["servers", "users", "audit"]) assert.equal(await r.locator(`[data-test=tab-${t}]`).count(), 0, `no ${t} tab`);
  await until("its VM's replication health", async () => (await r.locator("[data-test=summary-vm] [data-test=replication]").count()) === 1);
  await shot(r, "regular-summary");

  step("it sees only its VM, with its details");
  await openTab(r, "vms");
  await until("one VM", async () => (await r.locator("[data-test=vm-row]").count()) === 1);
  assert.equal(await r.locator("[data-test=vm-row]").getAttribute("data-name"), VM);
  const detail = r.locator("[data-test=vm-detail]");
  await detail.waitFor();
  const shown = (test) => text(detail.locator(`[data-test=${test}] .v`));
  assert.equal(await shown("vm-memory-size"), "128 MiB");
  assert.equal(await shown("vm-disk0"), "1 GiB");
  for (const i of [1, 2, 3]) assert.equal(await shown(`vm-disk${i}`), "--", `disk ${i} absent`);
  assert.match(await shown("vm-mac"), /^02:45:53:[0-9a-f]{2}:[0-9a-f]{2}:[0-9a-f]{2} \(lan\)$/);
  assert.equal(await shown("vm-ip"), "10.30.0.1 (lan, leased, not yet taken)");
  assert.equal(await r.locator("[data-test=vm-row] [data-test=delete]").count(), 0, "a Regular User has no Delete");
  // A Regular User sees which server, not its address or pool.
  assert.match(await text(r.locator("[data-test=vm-primary]")), /^server \d+$/);

  step("it powers the VM on; the status turns running without a reload");
  await r.evaluate(() => {
    window.__sameDocument = true;
  });
  await r.click("[data-test=vm-row] [data-test=power-on]");
  await until("status running", async () => (await text(r.locator("[data-test=vm-row] [data-test=vm-status]"))) === "running", 90000);
  assert.equal(await r.evaluate(() => window.__sameDocument), true, "the page was not reloaded");
  assert.equal(await r.locator("[data-test=vm-row] [data-test=power-off]").count(), 1);
  await shot(r, "regular-running");

  step("the Manager sees it running, on its primary with a backup");
  await openTab(m, "vms");
  await until("the VM running for the Manager", async () => (await text(vmRow(m, VM).locator("[data-test=vm-status]"))) === "running");
  await vmRow(m, VM).locator("[data-test=vm-details-toggle]").click();
  await m.locator(`[data-test=vm-detail]`).first().waitFor();
  assert.doesNotMatch(await text(vmRow(m, VM).locator("[data-test=vm-backup]")), /No Backup/);
  await shot(m, "manager-vms");

  step("the Manager migrates the running VM to its backup server once in sync; the Regular User sees it move");
  const primaryOf = async (page) => text(vmRow(page, VM).locator("[data-test=vm-primary]"));
  const backupBefore = await text(vmRow(m, VM).locator("[data-test=vm-backup]"));
  assert.match(backupBefore, /^127\.0\.0\.1:\d+ \(default pool\)$/, "a Manager sees the address and pool");
  const backupServer = await vmRow(m, VM).locator("[data-test=vm-backup] .place").getAttribute("data-server");
  const migrate = vmRow(m, VM).locator("[data-test=migrate]");
  await until("Migrate enabled (the backup in sync)", async () => !(await migrate.isDisabled()), 90000);
  assert.equal(await vmRow(p, VM).locator("[data-test=migrate]").count(), 0, "a Power User has no Migrate");
  await migrate.click();
  await until("the VM on its old backup server", async () => (await primaryOf(m)) === backupBefore, 30000);
  await until("the VM running again after the move", async () => (await text(vmRow(m, VM).locator("[data-test=vm-status]"))) === "running", 90000);
  await until("the owner sees the new primary, without a reload", async () => (await text(r.locator("[data-test=vm-row] [data-test=vm-primary]"))) === `server ${backupServer}`);
  await shot(m, "manager-migrated");

  step("the Regular User opens its VM's graphical console from the VMs page: the guest's screen, and its keyboard");
  await r.click("[data-test=vm-row] [data-test=console]");
  await r.waitForSelector("[data-test=page][data-page=console]");
  await until("the graphical console connected", async () => (await r.locator("[data-test=console-state]").getAttribute("data-state")) === "connected", 30000);
  // The test guest's colour bars: white, yellow, cyan, green... across the top half.
  const pixel = (fx, fy) =>
    r.evaluate(([fx, fy]) => {
      const c = document.querySelector("[data-test=vnc-screen] canvas");
      if (!c || c.width < 8) return null;
      const d = c.getContext("2d").getImageData(Math.floor(c.width * fx), Math.floor(c.height * fy), 1, 1).data;
      return [d[0], d[1], d[2]];
    }, [fx, fy]);
  await until("the guest's colour bars on the screen", async () => JSON.stringify(await pixel(1 / 16, 1 / 4)) === "[255,255,255]" && JSON.stringify(await pixel(3 / 16, 1 / 4)) === "[255,255,0]" && JSON.stringify(await pixel(5 / 16, 1 / 4)) === "[0,255,255]", 30000);
  await shot(r, "regular-graphical-console");
  await r.locator("[data-test=vnc-screen] canvas").click();
  await r.keyboard.type("vnc ok");
  await r.keyboard.press("Enter");

  step("on its serial console, the guest says which keys it got; what the user types there reaches it too");
  await r.click("[data-test=console-serial]");
  await until("the serial console connected", async () => (await r.locator("[data-test=console-state]").getAttribute("data-state")) === "connected", 30000);
  const terminal = r.locator("[data-test=serial-terminal] .xterm-rows");
  await until("the keys typed on the graphical console", async () => (await terminal.innerText()).includes("line=vnc ok"), 30000);
  await until("the guest's serial output", async () => (await terminal.innerText()).includes("tg: echo ready"), 30000);
  await r.locator("[data-test=serial-terminal]").click();
  await r.keyboard.type(`typed by ${REGULAR}`);
  await r.keyboard.press("Enter");
  await until("the guest echoes the line", async () => (await terminal.innerText()).includes(`tg: echo typed by ${REGULAR}`), 30000);
  await shot(r, "regular-serial-console");

  step("the Manager migrates the VM back, live, while its owner watches the serial console: the console reconnects to the same guest, which echoes on without booting again");
  await openTab(m, "vms");
  const back = vmRow(m, VM).locator("[data-test=migrate]");
  await until("Migrate enabled again (the backup in sync)", async () => !(await back.isDisabled()), 90000);
  assert.match(await back.getAttribute("title"), /moves live/, "the button says the VM moves live");
  await back.click();
  await until("the console says it closed", async () => ["closed", "failed", "connecting"].includes(await r.locator("[data-test=console-state]").getAttribute("data-state")), 30000);
  await until("the console connected again, to the VM's new server", async () => (await r.locator("[data-test=console-state]").getAttribute("data-state")) === "connected", 90000);
  await r.locator("[data-test=serial-terminal]").click();
  await r.keyboard.type("after the move");
  await r.keyboard.press("Enter");
  await until("the same guest echoes it", async () => (await terminal.innerText()).includes("tg: echo after the move"), 30000);
  assert.doesNotMatch(await terminal.innerText(), /tg: keys waiting|tg: entry/, "the guest did not boot again");
  await shot(r, "regular-serial-console-reconnected");
  await r.click("[data-test=console-back]");
  await r.waitForSelector("[data-test=page][data-page=vms]");

  step("the Regular User puts the library's ISO into its VM's CD-ROM drive, then ejects it");
  const cdrom = r.locator("[data-test=vm-detail] [data-test=cdrom-select]");
  await until("the ISO offered", async () => (await cdrom.locator(`option[value="${ISO}"]`).count()) === 1);
  await cdrom.selectOption(ISO);
  await until("the CD-ROM holds it", async () => (await r.locator("[data-test=vm-detail] [data-test=cdrom-eject]").count()) === 1);
  assert.equal(await cdrom.inputValue(), ISO);
  await openTab(m, "library");
  await until("the Manager sees it in use", async () => /VM \d+/.test(await text(m.locator(`[data-test=iso-row][data-name="${ISO}"]`))));
  assert.equal(await m.locator(`[data-test=iso-row][data-name="${ISO}"] [data-test=iso-delete]`).isDisabled(), true, "an ISO in use is not deleted");
  await shot(r, "regular-cdrom");
  await r.click("[data-test=vm-detail] [data-test=cdrom-eject]");
  await until("the CD-ROM empty", async () => (await cdrom.inputValue()) === "" && (await r.locator("[data-test=vm-detail] [data-test=cdrom-eject]").count()) === 0);

  step("the Regular User backs its running VM up from its detail row: a task whose end it sees there; the Manager finds the backup in the library");
  const backupNow = r.locator("[data-test=vm-detail] [data-test=backup]");
  await until("Back up now enabled (the disks in sync)", async () => !(await backupNow.isDisabled()), 60000);
  await backupNow.click();
  await until("the backup done", async () => (await r.locator("[data-test=vm-detail] [data-test=vm-backup-state]").getAttribute("data-state")) === "done", 60000);
  assert.match(await text(r.locator("[data-test=vm-detail] [data-test=vm-backup-state]")), new RegExp(`^${VM}-\\d{8}-\\d{6}: done`));
  assert.equal(await text(r.locator("[data-test=vm-row] [data-test=vm-status]")), "running", "it ran on");
  await shot(r, "regular-backup");
  await openTab(m, "library");
  const backupRow = m.locator("[data-test=appliance-row]", { hasText: "live backup of VM" });
  await until("the backup in the library", async () => (await backupRow.count()) === 1);
  await backupRow.locator("[data-test=appliance-select]").check();
  await m.click("[data-test=appliances-delete]");
  await m.waitForSelector("[data-test=appliances-empty]");

  step("the Power User cannot delete a running VM: its Delete waits for power off");
  assert.equal(await vmRow(p, VM).locator("[data-test=delete]").isDisabled(), true);

  step("the Regular User powers it off; the status turns stopped without a reload");
  const status = () => text(r.locator("[data-test=vm-row] [data-test=vm-status]"));
  await r.click("[data-test=vm-row] [data-test=power-off]");
  const off = await until("status stopping or stopped", async () => ["stopping", "stopped"].includes(await status()) && (await status()));
  if (off === "stopping") {
    // The guest was asked to shut down (the test guest ignores the ACPI power button and
    // would be stopped hard after the servers' 60 s timeout): Force Off stops it now.
    await shot(r, "regular-stopping");
    await r.click("[data-test=vm-row] [data-test=force-off]");
  }
  await until("status stopped", async () => (await status()) === "stopped", 90000);
  assert.equal(await r.evaluate(() => window.__sameDocument), true, "the page was not reloaded");
  assert.equal(await r.locator("[data-test=vm-row] [data-test=power-on]").count(), 1);
  await shot(r, "regular-stopped");

  step("the Regular User changes its own password");
  await r.click("[data-test=account]");
  await r.waitForSelector("[data-test=page][data-page=account]");
  // A wrong current password is refused and shown.
  await r.fill("[data-test=account-current-password]", "not-my-password");
  await r.fill("[data-test=account-password]", NEW_PASSWORD);
  await r.fill("[data-test=account-password-again]", NEW_PASSWORD);
  await r.click("[data-test=account-save]");
  await r.waitForSelector("[data-test=account-password-form] [data-test=form-error]:not(.hidden)");
  assert.match(await text(r.locator("[data-test=account-password-form] [data-test=form-error]")), /current password/);
  await r.fill("[data-test=account-current-password]", PASSWORD);
  await r.click("[data-test=account-save]");
  await r.waitForSelector("[data-test=info]");
  await until("its account details", async () => /Regular User/.test(await text(r.locator("[data-test=account-about]"))));
  await shot(r, "regular-account");
  await r.click("[data-test=logout]");
  await r.waitForSelector("[data-test=login-form]");
  await login(r, at(2), REGULAR, NEW_PASSWORD);
  await openTab(r, "vms");

  step("the Power User clones the stopped VM from its detail row; the copy is the Power User's own");
  const CLONE = `${VM}-copy`;
  await vmRow(p, VM).locator("[data-test=vm-details-toggle]").click();
  const cloneButton = p.locator(`[data-test=vm-detail][data-vmid] [data-test=clone]`).first();
  await until("Clone VM enabled (the VM stopped)", async () => !(await cloneButton.isDisabled()));
  p.once("dialog", (d) => void d.accept(CLONE));
  await cloneButton.click();
  await until(`${CLONE} listed`, async () => (await vmRow(p, CLONE).count()) === 1, 30000);
  assert.match(await text(vmRow(p, CLONE)), new RegExp(POWER), "the copy belongs to the Power User");
  await shot(p, "power-user-cloned");
  assert.equal(await vmRow(r, CLONE).count(), 0, "the Regular User does not see the Power User's copy");
  await until("the clone's Delete enabled", async () => !(await vmRow(p, CLONE).locator("[data-test=delete]").isDisabled()));
  await vmRow(p, CLONE).locator("[data-test=delete]").click();
  await vmRow(p, CLONE).locator("[data-test=confirm-delete-yes]").click();
  await until(`${CLONE} gone`, async () => (await vmRow(p, CLONE).count()) === 0);

  step("the Power User deletes the VM");
  await until("Delete enabled", async () => !(await vmRow(p, VM).locator("[data-test=delete]").isDisabled()));
  await vmRow(p, VM).locator("[data-test=delete]").click();
  await vmRow(p, VM).locator("[data-test=confirm-delete-yes]").click();
  await until(`${VM} gone`, async () => (await vmRow(p, VM).count()) === 0);
  await shot(p, "power-user-deleted");
  await until("the Regular User's page empty", async () => (await r.locator("[data-test=vms-empty]").count()) === 1);
  await shot(r, "regular-no-vm");

  if (ova) {
    step("Library Mgmt: the Manager imports an OVA (a stream-optimized VMDK inside) and shares it with the Power User's company");
    await openTab(m, "library");
    await m.waitForSelector("[data-test=appliances-empty]");
    await m.setInputFiles("[data-test=ova-file]", ova);
    assert.equal(await m.inputValue("[data-test=ova-name]"), "boot-disk", "the name comes from the file");
    await m.fill("[data-test=ova-name]", APP);
    await m.click("[data-test=ova-import]");
    await until("the OVA imported", async () => /Imported/.test(await text(m.locator("[data-test=ova-progress-text]"))), 60000);
    const appRow = m.locator(`[data-test=appliance-row][data-name="${APP}"]`);
    await until("the appliance on both VM servers", async () => (await text(appRow.locator("[data-test=appliance-ready]"))) === "2 of 2 VM servers", 60000);
    assert.equal(await text(appRow.locator("[data-test=appliance-disk0]")), "1 MiB");
    assert.equal(await text(appRow.locator("[data-test=appliance-disk1]")), "--");
    assert.match(await text(appRow), /128 MiB[\s\S]*BIOS, SATA/);
    await appRow.locator("[data-test=appliance-modify-open]").click();
    await m.locator("[data-test=appliance-modify] label", { hasText: POWER }).locator("input").check();
    await m.fill("[data-test=appliance-description]", "the boot disk");
    await m.click("[data-test=appliance-modify-save]");
    await until("the change saved", async () => (await m.locator("[data-test=appliance-modify]").count()) === 0 && /the boot disk/.test(await text(appRow)));
    await shot(m, "manager-appliances");

    if (directory) {
      step("the Manager opens an appliance directory and downloads what it offers: a task, done, the appliance listed (then deleted)");
      await m.fill("[data-test=directory-url]", directory);
      await m.click("[data-test=directory-open]");
      const entry = m.locator('[data-test=directory-row][data-name="from-directory"]');
      await until("the directory's offer listed", async () => (await entry.count()) === 1, 30000);
      assert.match(await text(entry), /the boot disk, from a directory/);
      await entry.locator("[data-test=directory-download]").click();
      const got = m.locator('[data-test=appliance-row][data-name="from-directory"]');
      await until("the downloaded appliance listed", async () => (await got.count()) === 1, 60000);
      await until("its download task done", async () => (await m.locator("[data-test=task-row][data-state=done]", { hasText: "downloading appliance from-directory" }).count()) === 1, 30000);
      await shot(m, "manager-directory");
      await got.locator("[data-test=appliance-select]").check();
      await m.click("[data-test=appliances-delete]");
      await until("the downloaded appliance deleted", async () => (await got.count()) === 0, 30000);
    }

    step("the Power User makes a VM of it: the appliance's memory, firmware and disk bus are the form's defaults; its BIOS boots the appliance's disk");
    await openTab(p, "vms");
    await until("the appliance among the choices", async () => (await p.locator(`[data-test=vm-appliance] option[value="${APP}"]`).count()) === 1, 30000);
    await p.fill("[data-test=vm-create] [data-test=vm-name]", APPVM);
    await p.selectOption("[data-test=vm-appliance]", APP);
    assert.equal(await p.inputValue("[data-test=vm-memory]"), "128");
    assert.equal(await p.inputValue("[data-test=vm-boot]"), "bios:disk_first");
    assert.equal(await p.inputValue("[data-test=vm-disk-bus]"), "sata");
    assert.equal(await p.inputValue("[data-test=vm-disk]"), "", "Disk0: the image's size");
    await p.check("[data-test=vm-start]");
    await p.click("[data-test=vm-create-submit]");
    const appVm = vmRow(p, APPVM);
    await until(`${APPVM} listed`, async () => (await appVm.count()) === 1, 30000);
    // Its program powers the VM off: Power On shows again once the cluster knows.
    await until(`${APPVM} booted and powered itself off`, async () => (await appVm.locator("[data-test=power-on]").count()) === 1 && (await text(appVm.locator("[data-test=vm-status]"))) === "stopped", 90000);

    step("it copies the VM back into an appliance of its company's: a task the Manager sees end");
    await appVm.locator("[data-test=vm-details-toggle]").click();
    const copyBack = p.locator(`[data-test=vm-detail][data-vmid="${await appVm.getAttribute("data-vmid")}"] [data-test=copy-back]`);
    await until("Copy back enabled", async () => !(await copyBack.isDisabled()));
    p.once("dialog", (d) => void d.accept(TPL));
    await copyBack.click();
    await openTab(m, "library");
    await until("the task done", async () => (await m.locator("[data-test=task-row][data-state=done]", { hasText: TPL }).count()) === 1, 60000);
    const tplRow = m.locator(`[data-test=appliance-row][data-name="${TPL}"]`);
    await until("the copied-back appliance listed", async () => (await tplRow.count()) === 1);
    assert.match(await text(tplRow), /copy back of VM/);
    await shot(m, "manager-appliances-copied-back");

    step("the Manager deletes both appliances; the Power User deletes its VM");
    for (const row of [appRow, tplRow]) await row.locator("[data-test=appliance-select]").check();
    await m.click("[data-test=appliances-delete]");
    await m.waitForSelector("[data-test=appliances-empty]");
    await appVm.locator("[data-test=delete]").click();
    await appVm.locator("[data-test=confirm-delete-yes]").click();
    await until(`${APPVM} gone`, async () => (await appVm.count()) === 0);
  }

  if (barsIso) {
    step("the Manager uploads a bootable CD and creates a blank VM (its disks on SATA) that boots it: the BIOS, the CD's screen in noVNC at the size the guest set");
    await openTab(m, "library");
    await m.setInputFiles("[data-test=iso-file]", barsIso);
    await m.fill("[data-test=iso-name]", BARS);
    await m.click("[data-test=iso-upload]");
    await until("the CD uploaded", async () => /Uploaded/.test(await text(m.locator("[data-test=iso-progress-text]"))), 60000);
    await until("the CD on both VM servers", async () => (await text(m.locator(`[data-test=iso-row][data-name="${BARS}"] [data-test=iso-ready]`))) === "2 of 2 VM servers", 60000);
    await openTab(m, "vms");
    await until("the CD among the new VM's choices", async () => (await m.locator(`[data-test=vm-iso] option[value="${BARS}"]`).count()) === 1);
    assert.equal(await m.locator("[data-test=vm-boot]").inputValue(), "bios:disk_first", "a blank PC is the default");
    await fillForm(m, "vm-create", { "vm-name": BLANK, "vm-memory": 128, "vm-vcpus": 1, "vm-disk": 1, "vm-disk1-size": 1 });
    await m.selectOption("[data-test=vm-boot]", "bios:cdrom_first");
    assert.equal(await m.locator("[data-test=vm-disk-bus]").inputValue(), "virtio", "virtio disks are the default");
    await m.selectOption("[data-test=vm-disk-bus]", "sata");
    await m.selectOption("[data-test=vm-iso]", BARS);
    await m.check("[data-test=vm-start]");
    await m.click("[data-test=vm-create-submit]");
    await until(`${BLANK} running`, async () => (await vmRow(m, BLANK).count()) === 1 && (await text(vmRow(m, BLANK).locator("[data-test=vm-status]"))) === "running", 60000);
    await vmRow(m, BLANK).locator("[data-test=console]").click();
    await m.waitForSelector("[data-test=page][data-page=console]");
    await until("the blank VM's graphical console connected", async () => (await m.locator("[data-test=console-state]").getAttribute("data-state")) === "connected", 30000);
    const screenAt = (x, y) =>
      m.evaluate(([x, y]) => {
        const c = document.querySelector("[data-test=vnc-screen] canvas");
        if (!c || c.width !== 1024 || c.height !== 768) return null;
        const d = c.getContext("2d").getImageData(x, y, 1, 1).data;
        return [d[0], d[1], d[2]];
      }, [x, y]);
    await until("the CD's bars at 1024x768 (DesktopSize) in noVNC", async () =>
      JSON.stringify(await screenAt(100, 300)) === "[255,0,0]" && JSON.stringify(await screenAt(300, 300)) === "[0,255,0]" &&
      JSON.stringify(await screenAt(600, 300)) === "[0,0,255]" && JSON.stringify(await screenAt(1000, 766)) === "[255,255,255]", 60000);
    await shot(m, "manager-blank-vm-console");
    await m.click("[data-test=console-back]");

    step("powered off, the blank VM is changed in its detail row: more memory, Disk1 grown, a third disk");
    const blankRow = vmRow(m, BLANK);
    await blankRow.locator("[data-test=power-off]").click();
    // Its program ignores the ACPI power button: Force Off once it is stopping.
    await blankRow.locator("[data-test=force-off]").click();
    await until(`${BLANK} stopped`, async () => (await text(blankRow.locator("[data-test=vm-status]"))) === "stopped", 60000);
    await blankRow.locator("[data-test=vm-details-toggle]").click();
    const blankDetail = m.locator(`[data-test=vm-detail][data-vmid="${await blankRow.getAttribute("data-vmid")}"]`);
    const blankShown = (test) => text(blankDetail.locator(`[data-test=${test}] .v`));
    assert.equal(await blankShown("vm-disk1"), "1 GiB");
    assert.equal(await blankShown("vm-disk2"), "--");
    assert.equal(await blankShown("vm-boot-mode"), "BIOS, CD-ROM first, disks on SATA");
    await until("Change VM enabled", async () => !(await blankDetail.locator("[data-test=vm-edit-submit]").isDisabled()));
    await blankDetail.locator("[data-test=vm-edit-memory]").fill("256");
    assert.equal(await blankDetail.locator("[data-test=vm-edit-disk1]").inputValue(), "1");
    await blankDetail.locator("[data-test=vm-edit-disk1]").fill("3");
    await blankDetail.locator("[data-test=vm-edit-add-disk]").fill("2");
    assert.equal(await blankDetail.locator("[data-test=vm-edit-disk-bus]").inputValue(), "sata");
    await blankDetail.locator("[data-test=vm-edit-disk-bus]").selectOption("virtio");
    await blankDetail.locator("[data-test=vm-edit-submit]").click();
    await until("the change shown", async () => (await blankShown("vm-memory-size")) === "256 MiB" && (await blankShown("vm-disk1")) === "3 GiB" &&
      (await blankShown("vm-disk2")) === "2 GiB" && (await blankShown("vm-boot-mode")) === "BIOS, CD-ROM first, disks on virtio", 30000);
    await shot(m, "manager-blank-vm-changed");
  }

  if (installerIso) {
    step("the Manager installs a system from a CD in a blank VM: the installer writes the disk and powers off; the CD ejected, the VM boots the installed disk, its screen in noVNC and its words on the serial console");
    await openTab(m, "library");
    await m.setInputFiles("[data-test=iso-file]", installerIso);
    await m.fill("[data-test=iso-name]", INSTALLER);
    await m.click("[data-test=iso-upload]");
    await until("the installer uploaded", async () => /Uploaded/.test(await text(m.locator("[data-test=iso-progress-text]"))), 60000);
    await until("the installer on both VM servers", async () => (await text(m.locator(`[data-test=iso-row][data-name="${INSTALLER}"] [data-test=iso-ready]`))) === "2 of 2 VM servers", 60000);
    await openTab(m, "vms");
    await until("the installer among the new VM's choices", async () => (await m.locator(`[data-test=vm-iso] option[value="${INSTALLER}"]`).count()) === 1);
    // A blank PC, as created by default: its disk first, then the CD.
    await fillForm(m, "vm-create", { "vm-name": INSTALLED, "vm-memory": 128, "vm-vcpus": 1, "vm-disk": 1 });
    await m.selectOption("[data-test=vm-boot]", "bios:disk_first");
    await m.selectOption("[data-test=vm-iso]", INSTALLER);
    await m.check("[data-test=vm-start]");
    await m.click("[data-test=vm-create-submit]");
    const row = vmRow(m, INSTALLED);
    await until(`${INSTALLED} created`, async () => (await row.count()) === 1, 30000);
    // The blank disk falls through to the CD, whose installer writes the disk and powers off.
    await until("the installer done: the VM stopped by itself", async () => (await text(row.locator("[data-test=vm-status]"))) === "stopped" && (await row.locator("[data-test=power-on]").count()) === 1, 90000);
    await row.locator("[data-test=vm-details-toggle]").click();
    const detail = m.locator(`[data-test=vm-detail][data-vmid="${await row.getAttribute("data-vmid")}"]`);
    await detail.locator("[data-test=cdrom-eject]").click();
    await until("the CD-ROM empty", async () => (await detail.locator("[data-test=cdrom-select]").inputValue()) === "" && (await detail.locator("[data-test=cdrom-eject]").count()) === 0);
    await row.locator("[data-test=power-on]").click();
    await until(`${INSTALLED} running from its disk`, async () => (await text(row.locator("[data-test=vm-status]"))) === "running", 60000);
    await row.locator("[data-test=console]").click();
    await m.waitForSelector("[data-test=page][data-page=console]");
    await until("the installed system's console connected", async () => (await m.locator("[data-test=console-state]").getAttribute("data-state")) === "connected", 30000);
    // Its text screen: "TICK" white on blue at the top left.
    await until("the installed system's screen in noVNC", async () =>
      m.evaluate(() => {
        const c = document.querySelector("[data-test=vnc-screen] canvas");
        if (!c || c.width < 320) return false;
        const [r, g, b] = c.getContext("2d").getImageData(1, 1, 1, 1).data;
        return b > 100 && r < 60 && g < 60;
      }), 60000);
    await shot(m, "manager-installed-vm-console");
    await m.click("[data-test=console-serial]");
    const serial = m.locator("[data-test=serial-terminal] .xterm-rows");
    await until("the installed system on its serial console", async () => {
      const t = await serial.innerText();
      // Booted from the disk (no CD in the drive), reading it as it counts.
      return t.includes("bootdisk: stage 2 read through int 13h") && /bootdisk: tick n=[0-9A-F]{4}/.test(t) && !t.includes("FAIL");
    }, 60000);
    await shot(m, "manager-installed-vm-serial");
    await m.click("[data-test=console-back]");
    // Its system ignores the ACPI power button: Force Off once it is stopping.
    await row.locator("[data-test=power-off]").click();
    await row.locator("[data-test=force-off]").click();
    await until(`${INSTALLED} stopped`, async () => (await text(row.locator("[data-test=vm-status]"))) === "stopped", 60000);
  }

  step("the Manager's audit log shows it all");
  await openTab(m, "audit");
  await until("audit entries", async () => (await m.locator("[data-test=audit-row]").count()) > 0);
  const log = await text(m.locator("[data-test=audit-table]"));
  for (const what of ["user.create", "vm.create", "vm.power_on", "vm.power_off", "vm.delete"]) assert.match(log, new RegExp(what.replace(".", "\\.")), `${what} in the audit log`);
  assert.match(log, new RegExp(VM));
  await shot(m, "manager-audit");

  step("the Manager drains server 2, then removes it from the cluster");
  await openTab(m, "servers");
  const row2 = m.locator("[data-test=server-row][data-server='2']");
  await row2.waitFor();
  await row2.locator("[data-test=server-drain]").click();
  await until("server 2 draining", async () => (await row2.locator("[data-test=server-draining]").count()) === 1);
  await until("Remove enabled", async () => !(await row2.locator("[data-test=server-remove]").isDisabled()));
  await shot(m, "manager-server-drained");
  await row2.locator("[data-test=server-remove]").click();
  await until("server 2 gone", async () => (await m.locator("[data-test=server-row]").count()) === 2, 30000);

  step("the Manager adds server 4, which waits for a cluster, by its address and join token");
  await m.fill("[data-test=server-add-address]", newServer);
  await m.fill("[data-test=server-add-token]", "not-its-token");
  await m.click("[data-test=server-add-submit]");
  await until("a malformed token refused", async () => /not a join token/.test(await text(m.locator("[data-test=server-add-error]"))));
  // Its certificate's fingerprint, another secret: the waiting server itself refuses.
  await m.fill("[data-test=server-add-token]", newServerToken.slice(0, -32) + "0".repeat(32));
  await m.click("[data-test=server-add-submit]");
  await until("a wrong token refused", async () => /wrong join token/.test(await text(m.locator("[data-test=server-add-error]"))));
  await m.fill("[data-test=server-add-token]", newServerToken);
  await m.click("[data-test=server-add-submit]");
  await until("server 4 listed", async () => (await m.locator("[data-test=server-row][data-server='4']").count()) === 1, 30000);
  await shot(m, "manager-server-added");

  step("the Manager logs out");
  await m.click("[data-test=logout]");
  await m.waitForSelector("[data-test=login-form]");
  const after = await m.request.get(`${at(0)}/api/v1/session`);
  assert.equal(after.status(), 401, "the session is over");

  assert.deepEqual(problems, [], "no script errors or CSP violations in the pages");
  step(`passed; ${shots} screenshots in ${artifacts}`);
} catch (e) {
  console.error(`FAILED: ${e.stack ?? e}`);
  if (problems.length) console.error(`page problems:\n  ${problems.join("\n  ")}`);
  for (const ctx of browser.contexts()) {
    for (const pg of ctx.pages()) {
      const file = path.join(artifacts, `failure-${++shots}.png`);
      await pg.screenshot({ path: file, fullPage: true }).catch(() => {});
      console.error(`  screenshot at failure: ${file} (${pg.url()})`);
    }
  }
  process.exitCode = 1;
} finally {
  await browser.close();
}

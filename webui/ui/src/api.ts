// The one way the UI talks to the REST API: JSON in and out, the session cookie sent by the
// browser, the CSRF token on every change, and the API's {"error": "..."} turned into an
// ApiError whose message is shown to the user.

import type { OpenUpload } from "./types";

/** A refused or failed request: `status` 0 when the server could not be reached. */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
  }
}

let csrf = "";
let onSessionLost: ((e: ApiError) => void) | null = null;

/** The session's CSRF token, sent as X-CSRF-Token on every change. */
export function setCsrf(token: string): void {
  csrf = token;
}

/** Called when a request of a logged-in page answers 401: the session is gone. */
export function onUnauthorized(f: ((e: ApiError) => void) | null): void {
  onSessionLost = f;
}

/** `method` on /api/v1`path` with a JSON `body`; the answer's JSON. */
export async function api<T>(method: string, path: string, body?: unknown): Promise<T> {
  const headers: Record<string, string> = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET") headers["X-CSRF-Token"] = csrf;
  let r: Response;
  try {
    r = await fetch(`/api/v1${path}`, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "same-origin",
      cache: "no-store",
    });
  } catch (e) {
    throw new ApiError(0, `cannot reach the server: ${e instanceof Error ? e.message : String(e)}`);
  }
  const text = await r.text();
  let data: unknown = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!r.ok) {
    const said =
      data && typeof data === "object" && typeof (data as { error?: unknown }).error === "string"
        ? (data as { error: string }).error
        : `${r.status} ${r.statusText || "error"}`;
    const err = new ApiError(r.status, said);
    if (r.status === 401 && onSessionLost) onSessionLost(err);
    throw err;
  }
  return data as T;
}

/** An error's message for the user. */
export function message(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

/** The bytes of one part of a resumable upload. */
const UPLOAD_PART = 64 << 20;
/** How many times in a row a part is sent again before the upload gives up. */
const UPLOAD_RETRIES = 5;

/**
 * Uploads `file` into the library as ISO or appliance (`kind`) `name`: a resumable upload
 * (`/api/v1/uploads`) sent in parts, `progress` hearing the bytes the server holds plus those
 * of the part on the way (fetch() cannot tell upload progress, XMLHttpRequest can). A part that
 * fails on the way (the network, the server busy) is sent again from where the server says,
 * while it still holds the upload; `resumed` hears each time. Answers the last part's answer:
 * the ISO, or the appliance's import task.
 */
export async function upload<T>(
  kind: "iso" | "appliance",
  name: string,
  file: Blob,
  progress: (sent: number, total: number) => void,
  resumed: (from: number, why: string) => void = () => {},
): Promise<T> {
  const open = await api<OpenUpload>("POST", "/uploads", { kind, name, size: file.size });
  const path = `/uploads/${encodeURIComponent(open.id)}`;
  let received = 0;
  let retries = 0;
  for (;;) {
    const end = Math.min(file.size, received + UPLOAD_PART);
    try {
      const [status, data] = await sendPart(path, received, file.slice(received, end), (n) => progress(received + n, file.size));
      if (status !== 200) return data as T;
      received = (data as OpenUpload).received;
      retries = 0;
    } catch (e) {
      // Still held by the server (broken on the way, or refused at its end and kept): again
      // from where it is (at the end, an empty part asks again), up to UPLOAD_RETRIES times;
      // gone (refused as it arrived): that is the answer.
      let held: OpenUpload;
      try {
        held = await api<OpenUpload>("GET", path);
      } catch {
        throw e;
      }
      retries += 1;
      if (retries > UPLOAD_RETRIES) {
        await api("DELETE", path).catch(() => undefined);
        throw e;
      }
      resumed(held.received, message(e));
      await new Promise((r) => setTimeout(r, 1000 * retries));
      received = held.received;
    }
  }
}

/** PATCHes `part` of upload `path` from `offset`; its status and JSON, or an ApiError. */
function sendPart(path: string, offset: number, part: Blob, progress: (sent: number) => void): Promise<[number, unknown]> {
  return new Promise((resolve, reject) => {
    const x = new XMLHttpRequest();
    x.open("PATCH", `/api/v1${path}`);
    x.setRequestHeader("Content-Type", "application/octet-stream");
    x.setRequestHeader("Upload-Offset", String(offset));
    x.setRequestHeader("X-CSRF-Token", csrf);
    x.responseType = "text";
    x.upload.onprogress = (e) => progress(e.loaded);
    x.onerror = () => reject(new ApiError(0, "the upload broke off: cannot reach the server"));
    x.onload = () => {
      let data: unknown = null;
      try {
        data = x.responseText ? JSON.parse(x.responseText) : null;
      } catch {
        data = null;
      }
      if (x.status >= 200 && x.status < 300) {
        resolve([x.status, data]);
        return;
      }
      const said =
        data && typeof data === "object" && typeof (data as { error?: unknown }).error === "string"
          ? (data as { error: string }).error
          : `${x.status} ${x.statusText || "error"}`;
      const err = new ApiError(x.status, said);
      if (x.status === 401 && onSessionLost) onSessionLost(err);
      reject(err);
    };
    x.send(part);
  });
}

// The one way the UI talks to the REST API: JSON in and out, the session cookie sent by the
// browser, the CSRF token on every change, and the API's {"error": "..."} turned into an
// ApiError whose message is shown to the user.

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

/**
 * PUTs `file` as the raw body of /api/v1`path` (an upload), calling `progress` with the
 * bytes sent so far: fetch() cannot tell upload progress, XMLHttpRequest can.
 */
export function upload<T>(path: string, file: Blob, progress: (sent: number, total: number) => void): Promise<T> {
  return new Promise((resolve, reject) => {
    const x = new XMLHttpRequest();
    x.open("PUT", `/api/v1${path}`);
    x.setRequestHeader("Content-Type", "application/octet-stream");
    x.setRequestHeader("X-CSRF-Token", csrf);
    x.responseType = "text";
    x.upload.onprogress = (e) => progress(e.loaded, e.lengthComputable ? e.total : file.size);
    x.onerror = () => reject(new ApiError(0, "the upload broke off: cannot reach the server"));
    x.onload = () => {
      let data: unknown = null;
      try {
        data = x.responseText ? JSON.parse(x.responseText) : null;
      } catch {
        data = null;
      }
      if (x.status >= 200 && x.status < 300) {
        resolve(data as T);
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
    x.send(file);
  });
}

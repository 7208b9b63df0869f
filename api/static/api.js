// The service's HTTP API as promises. Every error answer is {"error": {"code", "message"}}; it becomes an
// ApiError carrying both, so the page can show the service's own words.

const KEY_STORE = "shotcache.apiKey";

export class ApiError extends Error {
  constructor(status, code, message, body = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.body = body;
  }
}

export function apiKey() {
  return sessionStorage.getItem(KEY_STORE) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_STORE, key);
  else sessionStorage.removeItem(KEY_STORE);
}

function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function errorOf(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON (a proxy's page, say): fall back to the status line
  }
  const error = body && body.error ? body.error : { code: "http_error", message: `${response.status} ${response.statusText}` };
  return new ApiError(response.status, error.code, error.message, body);
}

export async function request(method, path, { form = null, json = null, accept202 = false } = {}) {
  let response;
  const headers = json === null ? authHeaders() : { ...authHeaders(), "Content-Type": "application/json" };
  try {
    response = await fetch(path, { method, headers, body: json === null ? form : JSON.stringify(json) });
  } catch (err) {
    throw new ApiError(0, "network_error", `the service did not answer (${err.message})`);
  }
  if (response.ok) {
    if (response.status === 204) return { status: 204, body: null };
    return { status: response.status, body: await response.json() };
  }
  throw await errorOf(response);
}

export const getJSON = async (path) => (await request("GET", path)).body;

// POST a multipart form with upload progress (fetch cannot report it; XMLHttpRequest can).
export function upload(path, form, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    for (const [name, value] of Object.entries(authHeaders())) xhr.setRequestHeader(name, value);
    xhr.responseType = "json";
    xhr.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) onProgress(event.loaded, event.total);
    });
    xhr.addEventListener("load", () => {
      const body = xhr.response;
      if (xhr.status >= 200 && xhr.status < 300) {
        resolve({ status: xhr.status, body });
      } else {
        const error = body && body.error ? body.error : { code: "http_error", message: `${xhr.status} ${xhr.statusText}` };
        reject(new ApiError(xhr.status, error.code, error.message, body));
      }
    });
    xhr.addEventListener("error", () => reject(new ApiError(0, "network_error", "the upload failed: the service did not answer")));
    xhr.addEventListener("abort", () => reject(new ApiError(0, "aborted", "the upload was cancelled")));
    xhr.send(form);
  });
}

// A stored shot's thumbnail, fetched with the API key (an <img src> cannot send one) as an object URL.
const thumbCache = new Map();
export function thumbnailURL(taskId, shot) {
  const key = `${taskId}/${shot}`;
  if (!thumbCache.has(key)) {
    const url = fetch(`/v1/tasks/${encodeURIComponent(taskId)}/shots/${shot}/thumbnail`, { headers: authHeaders() })
      .then((r) => (r.ok ? r.blob() : Promise.reject(new Error(`thumbnail ${shot}: ${r.status}`))))
      .then((blob) => URL.createObjectURL(blob));
    url.catch(() => thumbCache.delete(key));
    thumbCache.set(key, url);
  }
  return thumbCache.get(key);
}

export function forgetThumbnails(taskId) {
  for (const [key, url] of thumbCache) {
    if (key.startsWith(`${taskId}/`)) {
      url.then((u) => URL.revokeObjectURL(u)).catch(() => {});
      thumbCache.delete(key);
    }
  }
}

// Poll a background build until the task is ready (200) or the build failed (its error status).
export async function waitForTask(taskId, onProgress, intervalMs = 400) {
  for (;;) {
    const { status, body } = await request("GET", `/v1/tasks/${encodeURIComponent(taskId)}`);
    if (status === 200) return body;
    onProgress(body.done, body.total);
    await new Promise((r) => setTimeout(r, intervalMs));
  }
}

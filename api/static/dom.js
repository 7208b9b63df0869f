// Small DOM helpers: no framework, text always set as text (never HTML), so names from users are inert.

export const $ = (selector, root = document) => root.querySelector(selector);

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export const percent = (x) => (x === null || x === undefined ? "–" : `${(100 * x).toFixed(1)}%`);

export function showError(node, error) {
  node.textContent = error ? error.message || String(error) : "";
}

// Labels styled as buttons open their file input on Enter and Space too (keyboard use).
export function keyboardPickers(root = document) {
  root.addEventListener("keydown", (event) => {
    const label = event.target.closest && event.target.closest("label[role=button]");
    if (!label || (event.key !== "Enter" && event.key !== " ")) return;
    event.preventDefault();
    const input = label.htmlFor ? document.getElementById(label.htmlFor) : null;
    if (input) input.click();
  });
}

const IMAGE_NAME = /\.(jpe?g|png|webp|bmp|gif|tiff?)$/i;
export const looksLikeImage = (file) => file.type.startsWith("image/") || IMAGE_NAME.test(file.name);

// Files dropped on a zone, folders walked recursively; each with its path relative to the drop.
export async function droppedFiles(dataTransfer) {
  const entries = [...dataTransfer.items]
    .map((item) => (item.webkitGetAsEntry ? item.webkitGetAsEntry() : null))
    .filter(Boolean);
  if (!entries.length) return [...dataTransfer.files].map((file) => ({ file, path: file.name }));
  const out = [];
  async function walk(entry, prefix) {
    if (entry.isFile) {
      const file = await new Promise((resolve, reject) => entry.file(resolve, reject));
      out.push({ file, path: prefix + file.name });
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      for (;;) {
        const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
        if (!batch.length) break;
        for (const child of batch) await walk(child, `${prefix}${entry.name}/`);
      }
    }
  }
  for (const entry of entries) await walk(entry, "");
  return out;
}

export function dropTarget(zone, onFiles) {
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", async (event) => {
    event.preventDefault();
    event.stopPropagation();
    zone.classList.remove("over");
    onFiles(await droppedFiles(event.dataTransfer));
  });
}

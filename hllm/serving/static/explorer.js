// The explorer page: plain fetch() calls to the server's JSON API, no framework, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
let health = null;
let history = []; // [{id, title}], oldest first

async function call(method, path, body, headers = {}) {
  const options = { method, headers: { ...headers } };
  if (body !== undefined) {
    options.headers["content-type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(`${response.status}: ${answer.detail || response.statusText}`);
  return answer;
}

function say(message) {
  $("status").textContent = message;
}

function fill(table, rows) {
  const body = $(table).querySelector("tbody");
  body.replaceChildren(
    ...rows.map(({ cells, className }) => {
      const tr = document.createElement("tr");
      if (className) tr.className = className;
      for (const [text, numeric] of cells) {
        const td = document.createElement("td");
        td.textContent = text;
        if (numeric) td.className = "num";
        tr.append(td);
      }
      return tr;
    }),
  );
}

function showHistory() {
  fill("history-table", history.map((item) => ({ cells: [[item.id], [item.title]] })));
}

async function recommend(k) {
  const answer = await call("POST", "recommend", { history: history.map((item) => item.id), k });
  return answer.items;
}

function showTop(items, highlight = null) {
  fill("topk", items.map((item, i) => ({
    cells: [[String(i + 1), true], [item.id], [item.title], [item.score.toFixed(4), true]],
    className: item.id === highlight ? "added" : "",
  })));
}

async function refresh(highlight = null) {
  showHistory();
  showTop(await recommend(Number($("k").value) || 10), highlight);
}

async function lookUp() {
  say("");
  const user = $("user").value;
  $("title-user").value = user; // the Creator panel then asks about the user whose history is shown
  history = (await call("GET", `samples/${encodeURIComponent(user)}`)).history;
  await refresh();
}

async function resolve(token) {
  const known = await fetch(`items/${encodeURIComponent(token)}`);
  if (known.ok) return { id: token, title: (await known.json()).title };
  const found = (await call("GET", `search?title=${encodeURIComponent(token)}&limit=1`)).items;
  if (!found.length) throw new Error(`no item has the id or a title containing "${token}"`);
  return found[0];
}

async function typed() {
  say("");
  const tokens = $("history").value.split(",").map((t) => t.trim()).filter(Boolean);
  if (!tokens.length) throw new Error("type item ids or titles, comma-separated");
  history = [];
  for (const token of tokens) history.push(await resolve(token));
  await refresh();
}

async function addItem() {
  say("");
  const fields = {};
  for (const input of $("new-fields").querySelectorAll("input")) {
    if (input.value.trim()) fields[input.dataset.field] = input.value.trim();
  }
  const id = $("new-id").value.trim();
  const key = $("key").value;
  const headers = key ? { authorization: `Bearer ${key}` } : {};
  const added = await call("POST", "items", { id, fields }, headers);
  health.items = added.items;
  if (!history.length) {
    $("rank").textContent = `added ${id}; pick a history to see where it ranks`;
    return;
  }
  const depth = Math.min(added.items, health.max_k);
  const ranked = await recommend(depth);
  const place = ranked.findIndex((item) => item.id === id);
  $("rank").textContent = place >= 0
    ? `${id} ranks #${place + 1} of ${added.items} items for this history (score ${ranked[place].score.toFixed(4)})`
    : `${id} is not in this history's top ${depth}`;
  await refresh(id);
}

async function creatorTitle() {
  say("");
  $("title-out").hidden = true;
  const user = $("title-user").value.trim();
  const item = $("title-item").value.trim();
  if (!user || !item) throw new Error("give a user id and an item id");
  const answer = await call("GET", `users/${encodeURIComponent(user)}/titles/${encodeURIComponent(item)}`);
  $("title-text").textContent = answer.title;
  $("title-source").textContent = `(${answer.source})`;
  $("title-original").textContent = answer.original_title;
  $("title-out").hidden = false;
}

async function start() {
  health = await call("GET", "health");
  const model = health.model;
  $("info").textContent = `${health.items} items, ${health.index} index; ${model.item_backbone} items, ${model.user_backbone} users`;
  $("key-label").hidden = !health.write_key;
  $("creator").hidden = !health.creator_titles;
  for (const field of health.text_fields.length ? health.text_fields : ["title"]) {
    const label = document.createElement("label");
    const input = document.createElement("input");
    Object.assign(input, { type: "text", id: `field-${field}` });
    input.dataset.field = field;
    label.append(`${field} `, input);
    $("new-fields").append(label);
  }
  const users = (await call("GET", "samples?limit=1000")).users;
  $("user").replaceChildren(...users.map(({ user, length }) => new Option(`${user} (${length} items)`, user)));
}

function guarded(action) {
  return () => action().catch((error) => say(error.message));
}

$("lookup").addEventListener("click", guarded(lookUp));
$("recommend").addEventListener("click", guarded(typed));
$("add").addEventListener("click", guarded(addItem));
$("creator-title").addEventListener("click", guarded(creatorTitle));
guarded(start)();

// Renders /openapi.json as a reference page: operations, parameters, bodies, responses, schemas.
// Self-contained (no CDN): works on an offline machine.
"use strict";

(async () => {
  const doc = await (await fetch("/openapi.json")).json();
  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  };
  const refName = (ref) => ref.split("/").pop();
  const resolve = (obj) => {
    let o = obj;
    for (let i = 0; o && o.$ref && i < 10; i++) {
      const parts = o.$ref.replace(/^#\//, "").split("/");
      o = parts.reduce((acc, p) => acc && acc[p], doc);
    }
    return o || {};
  };

  // a tiny Markdown subset: paragraphs, `code`, **bold**
  function markdown(text, into) {
    for (const para of text.split(/\n\n+/)) {
      const p = el("p");
      const re = /(`[^`]+`|\*\*[^*]+\*\*)/g;
      let last = 0;
      let m;
      const flat = para.replace(/\n/g, " ");
      while ((m = re.exec(flat)) !== null) {
        p.append(flat.slice(last, m.index));
        p.append(m[0].startsWith("`") ? el("code", "", m[0].slice(1, -1)) : el("strong", "", m[0].slice(2, -2)));
        last = m.index + m[0].length;
      }
      p.append(flat.slice(last));
      into.append(p);
    }
  }

  function typeText(s) {
    if (s.$ref) return refName(s.$ref);
    if (s.anyOf) return s.anyOf.map(typeText).join(" | ");
    if (s.type === "array") return `${s.items ? typeText(s.items) : "any"}[]`;
    if (s.enum && !s.type) return "enum";
    return s.type || (s.const !== undefined ? JSON.stringify(s.const) : "any");
  }

  function constraints(s) {
    const out = [];
    if (s.minimum !== undefined || s.maximum !== undefined) out.push(`${s.minimum ?? "…"}..${s.maximum ?? "…"}`);
    if (s.minLength !== undefined || s.maxLength !== undefined) out.push(`length ${s.minLength ?? 0}..${s.maxLength ?? "…"}`);
    if (s.maxItems !== undefined) out.push(`≤ ${s.maxItems} items`);
    if (s.default !== undefined) out.push(`default ${JSON.stringify(s.default)}`);
    if (s.enum) out.push(`one of ${s.enum.map((v) => JSON.stringify(v)).join(", ")}`);
    if (s.const !== undefined) out.push(`= ${JSON.stringify(s.const)}`);
    return out.join(" · ");
  }

  function schemaTree(schema, depth, seen) {
    const box = el("div", "schema");
    const s = resolve(schema);
    const props = s.properties || {};
    const required = new Set(s.required || []);
    if (!Object.keys(props).length) {
      box.append(el("span", "type", typeText(schema)), " ", el("span", "constraint", constraints(s)));
      return box;
    }
    for (const [name, raw] of Object.entries(props)) {
      const prop = el("div", "prop");
      prop.append(el("span", "name", name), ": ", el("span", "type", typeText(raw)));
      if (required.has(name)) prop.append(" ", el("span", "req", "required"));
      const inner = raw.anyOf ? raw.anyOf.find((x) => x.type !== "null") || raw : raw;
      const c = constraints({ ...resolve(inner), ...raw });
      if (c) prop.append(" ", el("span", "constraint", c));
      const d = raw.description || resolve(inner).description;
      if (d) prop.append(" ", el("span", "desc", "— " + d));
      box.append(prop);
      const target = inner.$ref ? inner : inner.items && inner.items.$ref ? inner.items : null;
      if (target && depth < 6 && !seen.has(target.$ref)) {
        box.append(schemaTree(target, depth + 1, new Set([...seen, target.$ref])));
      }
    }
    return box;
  }

  // intro
  const intro = document.getElementById("intro");
  intro.replaceChildren(el("h2", "", `${doc.info.title} ${doc.info.version} · OpenAPI ${doc.openapi}`));
  markdown(doc.info.description || "", intro);

  // operations
  const ops = document.getElementById("operations");
  for (const [path, item] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(item)) {
      const d = el("details", "op");
      d.id = op.operationId || `${method}-${path}`;
      const sum = el("summary");
      sum.append(el("span", `method ${method}`, method.toUpperCase()), el("span", "path", path), el("span", "", op.summary || ""));
      sum.append(el("span", "tag", (op.tags || []).join(", ") + (op.security && !op.security.length ? " · no auth" : "")));
      d.append(sum);
      const body = el("div", "body");
      if (op.description) markdown(op.description, body);
      if (op.parameters && op.parameters.length) {
        body.append(el("h3", "", "Parameters"));
        const box = el("div", "schema");
        for (const p of op.parameters) {
          const row = el("div", "prop");
          row.append(el("span", "name", p.name), ` (${p.in}): `, el("span", "type", typeText(p.schema || {})));
          if (p.required) row.append(" ", el("span", "req", "required"));
          const c = constraints(p.schema || {});
          if (c) row.append(" ", el("span", "constraint", c));
          if (p.description) row.append(" ", el("span", "desc", "— " + p.description));
          box.append(row);
        }
        body.append(box);
      }
      if (op.requestBody) {
        const media = op.requestBody.content["application/json"];
        body.append(el("h3", "", `Request body (application/json): ${typeText(media.schema)}`));
        body.append(schemaTree(media.schema, 0, new Set([media.schema.$ref])));
      }
      body.append(el("h3", "", "Responses"));
      for (const [status, raw] of Object.entries(op.responses)) {
        const r = resolve(raw);
        const row = el("div", "resp");
        row.append(el("span", `status s${status[0]}`, status));
        const right = el("div");
        right.append(el("div", "", r.description || ""));
        const media = r.content && (r.content["application/json"] || Object.values(r.content)[0]);
        if (media && media.schema && media.schema.$ref && status.startsWith("2")) {
          right.append(schemaTree(media.schema, 0, new Set([media.schema.$ref])));
        } else if (media && media.examples) {
          const first = Object.values(media.examples)[0];
          right.append(el("pre", "example", JSON.stringify(first.value, null, 2)));
        }
        row.append(right);
        body.append(row);
      }
      d.append(body);
      ops.append(d);
    }
  }

  // schemas
  const schemas = document.getElementById("schemas");
  for (const name of Object.keys(doc.components.schemas).sort()) {
    const d = el("details", "op");
    d.id = `schema-${name}`;
    const sum = el("summary");
    sum.append(el("span", "path", name));
    const s = doc.components.schemas[name];
    if (s.description) sum.append(el("span", "muted small", s.description.split("\n")[0]));
    d.append(sum);
    const body = el("div", "body");
    body.append(schemaTree({ $ref: `#/components/schemas/${name}` }, 0, new Set()));
    d.append(body);
    schemas.append(d);
  }
  if (location.hash) {
    const target = document.getElementById(location.hash.slice(1));
    if (target) { target.open = true; target.scrollIntoView(); }
  }
  document.body.dataset.ready = "true";
})();

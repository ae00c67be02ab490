/* The label review of the report: filters, sorting, paging and decisions over window.REVIEW_DATA.
 *
 * Plain JavaScript, with no library and no network, so that the page works from file://. The
 * data comes from review-data.js beside the page (written by report/gallery.py), because
 * browsers refuse fetch() of file:// URLs but run a <script src> from the same folder.
 *
 * Keys are strings from the user's data set (file names, say). Everything from the data is
 * inserted with text nodes or setAttribute, never as HTML, so that a key cannot become markup.
 *
 * Train ids stay the strings review-data.js holds (the DOM's data-train-id values are strings
 * too): they are int64, and a number would round those beyond 2^53 to another id.
 *
 * The decisions (storage, checks, decisions.csv) are review-store.js's, loaded just before.
 */
(function () {
  'use strict';

  const DATA = window.REVIEW_DATA;
  const root = document.getElementById('review');
  if (!root) return;
  const $ = (id) => document.getElementById(id);
  const items = $('rv-items');
  if (!DATA || !Array.isArray(DATA.suspects) || !window.ReviewStore) {
    items.textContent = 'review-data.js or review-store.js did not load: both must be in the same folder as ' +
      'this page.';
    return;
  }
  if (DATA.format !== 2) {  // format 1 held ids as numbers
    items.textContent = 'review-data.js was written by another version of the report: write the report again.';
    return;
  }

  const TABLE = !DATA.thumbs;
  const suspects = DATA.suspects;
  const byId = new Map(suspects.map((s) => [s.id, s]));
  const examples = DATA.examples || {};
  const state = {given: '', pred: '', pair: '', bad: false, undecided: false, sort: 'rank',
                 size: 48, page: 0, current: null};
  const store = window.ReviewStore(DATA, note);
  let shown = [];
  let picker = null;  // the train id whose class picker is open

  // ------------------------------------------------------------------------------ helpers

  /** An element; strings among the children become text nodes (Node.append), never HTML. */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === 'class') node.className = v;
      else node.setAttribute(k, v === true ? '' : String(v));
    }
    for (const c of children) if (c !== null && c !== undefined && c !== false) node.append(c);
    return node;
  }

  function fmtP(p) {
    if (p === null) return 'n/a';
    return p !== 0 && p < 0.001 ? p.toExponential(1) : p.toFixed(3);
  }

  function fmtG(v) {
    return v === null ? 'n/a' : String(Number(v.toPrecision(3)));
  }

  function note(text) {
    Object.assign($('rv-store-note'), {textContent: text, hidden: false});
  }

  // ------------------------------------------------------------------------ decisions

  function decide(id, action, newLabel) {
    const s = byId.get(id);
    if (!s) return;
    if (action === 'relabel' && (!Number.isInteger(newLabel) || newLabel === s.label)) return;
    const i = shown.findIndex((x) => x.id === id);
    // The next suspect is chosen before the filters run again: with "undecided only" this one leaves.
    const next = i >= 0 && i + 1 < shown.length ? shown[i + 1].id : id;
    const d = {action: action, new_label: action === 'relabel' ? newLabel : null,
               decided_at: new Date().toISOString(), label: s.label, rank: s.rank};
    if (DATA.has_keys) d.key = s.key === undefined ? null : s.key;
    store.set(id, d);
    picker = null;
    state.current = next;
    render(true);
  }

  function forget(id) {
    if (store.forget(id)) render(false);
  }

  function describe(d) {
    if (d.action === 'relabel') return 'relabel → ' + d.new_label;
    return d.action === 'unsure' ? 'not sure' : d.action;
  }

  function exportCsv() {
    const url = URL.createObjectURL(new Blob([store.csv()], {type: 'text/csv;charset=utf-8'}));
    const a = el('a', {href: url, download: 'decisions.csv', hidden: true});
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  }

  // ------------------------------------------------------------------ filters and order

  function matches(s) {
    if (state.given !== '' && s.label !== Number(state.given)) return false;
    if (state.pred !== '' && s.pred !== Number(state.pred)) return false;
    if (state.pair !== '') {
      const [a, b] = state.pair.split(':').map(Number);
      if (s.label !== a || s.pred !== b) return false;
    }
    if (state.bad && !s.bad) return false;
    return !(state.undecided && store.get(s.id));
  }

  function ordered(list) {
    if (state.sort === 'rank') return list;  // the data is in audit_rank order
    const sign = state.sort === 'p' ? 1 : -1;
    const key = (s) => (s.p === null ? Infinity : sign * s.p);  // a missing probability goes last
    return list.sort((a, b) => (key(a) - key(b)) || (a.rank - b.rank));
  }

  // ---------------------------------------------------------------------------- drawing

  function thumb(id, alt, cls) {
    return el('img', {class: cls, src: DATA.thumbs + '/train_' + id + '.png', alt: alt, title: alt,
                      loading: 'lazy', width: cls === 'thumb' ? 64 : 36, height: cls === 'thumb' ? 64 : 36});
  }

  function supporterText(id, r) {
    const [label, rank, , key] = examples[id] || ['?', '?', false, null];
    return 'train ' + id + (key != null ? ' (' + key + ')' : '') + ', label ' + label + ', audit rank ' + rank +
      ', r = ' + fmtG(r);
  }

  function support(s, kind) {
    const list = (s.sup || {})[kind === 'label' ? 'label' : 'pred'] || [];
    const title = kind === 'label' ? 'supports label ' + s.label + ':' : 'supports class ' + s.pred + ':';
    const figs = list.map(([id, r]) => {
      const [label, rank, bad] = examples[id] || ['?', '?', false];
      return el('figure', {class: bad ? 'bad' : null, 'data-train-id': id, title: supporterText(id, r)},
        thumb(id, supporterText(id, r), 'mini'),
        el('figcaption', {}, id, el('br'), 'label ' + label + ' · #' + rank));
    });
    return el('div', {class: 'support', 'data-kind': kind}, el('div', {class: 'why'}, title),
      ...(figs.length ? figs : ['none']));
  }

  function decisionBox(s) {
    const d = store.get(s.id);
    const button = (action, text, title, disabled) =>
      el('button', {type: 'button', 'data-action': action, title: title, disabled: disabled}, text);
    const box = el('div', {class: 'decision'},
      el('div', {class: 'status'}, d ? describe(d) : 'undecided'),
      button('keep', 'keep (k)', 'keep the given label ' + s.label),
      button('relabel', 'relabel → ' + s.pred + ' (r)', 'relabel to the model\'s class ' + s.pred,
             s.pred === s.label),
      button('other', 'other… (o)', 'relabel to another class'),
      button('remove', 'remove (x)', 'remove the example'),
      button('unsure', 'not sure (u)', 'not sure'),
      d ? button('forget', 'undo (⌫)', 'forget this decision') : null);
    if (picker === s.id) {
      const select = el('select', {class: 'rv-picker', 'aria-label': 'new label'},
        el('option', {value: ''}, 'class…'));
      for (let c = 0; c < DATA.n_classes; c++) {
        if (c !== s.label) select.append(el('option', {value: c}, String(c)));
      }
      if (s.pred !== s.label) select.value = String(s.pred);
      box.append(select, button('pick', 'relabel', 'relabel to the chosen class'));
    }
    return box;
  }

  function classes(s) {
    const d = store.get(s.id);
    return ['suspect', TABLE ? null : 'card', s.bad ? 'bad' : null, d ? 'decided d-' + d.action : null,
            s.id === state.current ? 'current' : null].filter(Boolean).join(' ');
  }

  function card(s) {
    const attrs = {class: classes(s), 'data-train-id': s.id, 'data-rank': s.rank, 'data-label': s.label,
                   'data-pred': s.pred};
    const key = s.key != null ? el('span', {class: 'key', title: s.key}, s.key) : null;
    const bad = s.bad ? el('span', {class: 'badge'}, 'known bad') : null;
    if (TABLE) {
      const td = (...c) => el('td', {}, ...c);
      const list = (items) => items.map(([id, r]) => supporterText(id, r)).join('; ') || 'none';
      const sups = s.sup ? [td(list(s.sup.label)), td(s.pred === s.label ? '(same class)' : list(s.sup.pred))] : [];
      return el('tr', attrs, td(String(s.rank)), td(s.id, bad, key ? el('br') : null, key),
        td(String(s.label)), td(String(s.pred)), td(fmtP(s.p)), td(fmtG(s.score)), ...sups, td(decisionBox(s)));
    }
    const alt = 'train ' + s.id + ', label ' + s.label + ', predicted ' + s.pred;
    const meta = el('div', {class: 'meta'}, el('b', {}, '#' + s.rank), ' · id ' + s.id, bad, el('br'),
      key, key ? el('br') : null, 'label ', el('b', {}, String(s.label)), ', model says ', el('b', {}, String(s.pred)),
      s.pp === undefined ? null : ' (' + fmtP(s.pp) + ')',
      el('br'), 'p(label) = ' + fmtP(s.p), el('br'), 'audit score ' + fmtG(s.score));
    return el('div', attrs, thumb(s.id, alt, 'thumb'), meta,
      s.sup ? support(s, 'label') : null, s.sup && s.pred !== s.label ? support(s, 'predicted') : null,
      decisionBox(s));
  }

  function tableHead() {
    const sups = ['supports the label (id, label, audit rank, r)', 'supports the predicted class'];
    const heads = ['rank', 'train id', 'label', 'predicted', 'p(label)', 'audit score']
      .concat(suspects.some((s) => s.sup) ? sups : [], ['decision']);
    return el('tr', {}, ...heads.map((h) => el('th', {}, h)));
  }

  function render(scroll) {
    shown = ordered(suspects.filter(matches));
    const size = state.size;
    const pages = Math.max(1, Math.ceil(shown.length / size));
    const at = shown.findIndex((s) => s.id === state.current);
    if (at >= 0) state.page = Math.floor(at / size);  // the page follows the current suspect
    state.page = Math.min(Math.max(0, state.page), pages - 1);
    if (at < 0) state.current = shown.length ? shown[state.page * size].id : null;
    const slice = shown.slice(state.page * size, (state.page + 1) * size);
    const drawn = slice.map(card);
    if (!slice.length) items.replaceChildren(el('p', {class: 'note'}, 'No suspect matches these filters.'));
    else if (TABLE) items.replaceChildren(el('table', {class: 'suspects'}, tableHead(), ...drawn));
    else items.replaceChildren(...drawn);
    $('rv-page').textContent = 'page ' + (state.page + 1) + ' of ' + pages;
    $('rv-prev').disabled = state.page === 0;
    $('rv-next').disabled = state.page >= pages - 1;
    progress();
    const current = items.querySelector('.suspect.current');
    if (scroll && current) current.scrollIntoView({block: 'nearest'});
    const select = items.querySelector('select.rv-picker');
    if (select) select.focus();
  }

  function progress() {
    const counts = {keep: 0, relabel: 0, remove: 0, unsure: 0};
    let decided = 0;
    for (const s of suspects) {
      const d = store.get(s.id);
      if (d && counts[d.action] !== undefined) { counts[d.action]++; decided++; }
    }
    $('rv-progress').textContent = decided + ' decided / ' + shown.length + ' shown / ' + suspects.length +
      ' suspects (keep ' + counts.keep + ', relabel ' + counts.relabel + ', remove ' + counts.remove +
      ', not sure ' + counts.unsure + ')';
    $('rv-export').textContent = 'export decisions.csv (' + store.count() + ')';
    for (const td of document.querySelectorAll('#rv-matrix td.cell')) {
      td.classList.toggle('chosen', td.dataset.pair === state.pair);
    }
  }

  // ----------------------------------------------------------------------- controls

  function fillSelect(id, values) {
    $(id).append(...values.map(([value, text]) => el('option', {value: value}, text)));
  }

  function countBy(key) {
    const counts = new Map();
    for (const s of suspects) counts.set(key(s), (counts.get(key(s)) || 0) + 1);
    return counts;
  }

  function pairText(a, b) {
    return a + ' → ' + b + (a === b ? ' (agrees)' : '');
  }

  function setupControls() {
    const num = (a, b) => a - b;
    const given = countBy((s) => s.label);
    const pred = countBy((s) => s.pred);
    fillSelect('rv-given', [...given.keys()].sort(num).map((c) => [c, c + ' (' + given.get(c) + ')']));
    fillSelect('rv-pred', [...pred.keys()].sort(num).map((c) => [c, c + ' (' + pred.get(c) + ')']));
    const pairs = countBy((s) => s.label + ':' + s.pred);
    fillSelect('rv-pair', [...pairs.keys()].sort((a, b) => (pairs.get(b) - pairs.get(a)) || a.localeCompare(b))
      .map((p) => [p, pairText(...p.split(':').map(Number)) + ' (' + pairs.get(p) + ')']));
    $('rv-size').value = String(state.size);
    const bind = (id, field, value) => $(id).addEventListener('change', (e) => {
      state[field] = value(e.target);
      if (field !== 'undecided') state.current = null;
      state.page = 0;
      picker = null;
      e.target.blur();  // the keys go back to the gallery
      render(false);
    });
    bind('rv-given', 'given', (t) => t.value);
    bind('rv-pred', 'pred', (t) => t.value);
    bind('rv-pair', 'pair', (t) => t.value);
    bind('rv-sort', 'sort', (t) => t.value);
    bind('rv-size', 'size', (t) => Number(t.value));
    bind('rv-undecided', 'undecided', (t) => t.checked);
    if ($('rv-bad')) bind('rv-bad', 'bad', (t) => t.checked);
    $('rv-clear').addEventListener('click', () => {
      Object.assign(state, {given: '', pred: '', pair: '', bad: false, undecided: false, page: 0, current: null});
      sync();
      render(false);
    });
    $('rv-prev').addEventListener('click', () => turn(-1));
    $('rv-next').addEventListener('click', () => turn(1));
    $('rv-export').addEventListener('click', exportCsv);
    $('rv-forget').addEventListener('click', () => {
      if (window.confirm('Forget every decision taken on this page for this audit?')) {
        store.clear();
        render(false);
      }
    });
    // The class tables of the page (written in Python, after this script) open the gallery
    // filtered to their row; listening on the document finds them wherever they are.
    document.addEventListener('click', (e) => {
      const row = e.target.closest && e.target.closest('tr.rv-link');
      if (row && row.dataset.pair) showPair(row.dataset.pair);
      else if (row && row.dataset.given !== undefined) show({given: row.dataset.given});
    });
  }

  function sync() {
    for (const field of ['given', 'pred', 'pair', 'sort']) $('rv-' + field).value = state[field];
    $('rv-undecided').checked = state.undecided;
    if ($('rv-bad')) $('rv-bad').checked = state.bad;
  }

  function show(filters) {
    Object.assign(state, {given: '', pred: '', pair: '', page: 0, current: null}, filters);
    picker = null;
    sync();
    render(false);
    root.scrollIntoView({block: 'start'});
  }

  function showPair(pair) {
    const select = $('rv-pair');
    if (![...select.options].some((o) => o.value === pair)) {  // a pair of the top 10% with no suspect here
      select.append(el('option', {value: pair}, pairText(...pair.split(':').map(Number)) + ' (0)'));
    }
    show({pair: pair});
  }

  function drawMatrix() {
    const box = $('rv-matrix-box');
    const labels = [...new Set(suspects.flatMap((s) => [s.label, s.pred]))].sort((a, b) => a - b);
    if (!suspects.length || labels.length > 30) {  // too wide to read: the pair list does the job
      box.hidden = true;
      return;
    }
    const counts = countBy((s) => s.label + ':' + s.pred);
    const rows = labels.map((a) => el('tr', {}, el('th', {}, String(a)), ...labels.map((b) => {
      const n = counts.get(a + ':' + b) || 0;
      const cls = [n ? 'cell' : null, a === b ? 'agree' : null].filter(Boolean).join(' ') || null;
      const title = n ? n + ' suspects labelled ' + a + ' that the model calls ' + b : null;
      return el('td', {class: cls, 'data-pair': n ? a + ':' + b : null, title: title}, n ? String(n) : '');
    })));
    const head = el('tr', {}, el('th', {}, 'given ↓ model →'), ...labels.map((b) => el('th', {}, String(b))));
    const table = el('table', {}, head, ...rows);
    table.addEventListener('click', (e) => {
      const td = e.target.closest('td.cell');
      if (td) showPair(td.dataset.pair);
    });
    $('rv-matrix').replaceChildren(table);
  }

  // ----------------------------------------------------------------------- navigation

  function move(delta) {
    const i = shown.findIndex((s) => s.id === state.current);
    const j = Math.min(Math.max(0, i + delta), shown.length - 1);
    if (j < 0 || j === i) return;
    state.current = shown[j].id;
    picker = null;
    render(true);
  }

  function turn(delta) {
    const pages = Math.max(1, Math.ceil(shown.length / state.size));
    const page = Math.min(Math.max(0, state.page + delta), pages - 1);
    if (page === state.page) return;
    state.page = page;
    state.current = null;
    picker = null;
    render(false);
    root.scrollIntoView({block: 'start'});
  }

  function openPicker(id) {
    if (!byId.has(id)) return;
    picker = id;
    state.current = id;
    render(true);
  }

  function pick(select) {
    const host = select.closest('.suspect');
    if (host && select.value !== '') decide(host.dataset.trainId, 'relabel', Number(select.value));
  }

  function act(id, action) {
    const s = byId.get(id);
    if (!s) return;
    if (action === 'relabel') decide(id, 'relabel', s.pred);
    else if (action === 'other') openPicker(id);
    else if (action === 'forget') forget(id);
    else if (action === 'pick') pick(items.querySelector('select.rv-picker'));
    else decide(id, action);
  }

  items.addEventListener('click', (e) => {
    const host = e.target.closest('.suspect');
    if (!host) return;
    const id = host.dataset.trainId;
    const button = e.target.closest('button[data-action]');
    if (button) {
      state.current = id;
      act(id, button.dataset.action);
    } else if (!e.target.closest('select') && state.current !== id) {
      state.current = id;
      for (const node of items.querySelectorAll('.suspect.current')) node.classList.remove('current');
      host.classList.add('current');
    }
  });

  items.addEventListener('keydown', (e) => {
    if (!e.target.matches('select.rv-picker')) return;
    if (e.key === 'Enter') pick(e.target);
    else if (e.key === 'Escape') { picker = null; render(false); }
    else return;
    e.preventDefault();
    e.stopPropagation();
  });

  const KEYS = {k: 'keep', r: 'relabel', o: 'other', x: 'remove', u: 'unsure', Backspace: 'forget', Delete: 'forget'};

  document.addEventListener('keydown', (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey || e.defaultPrevented) return;
    if (e.target.closest && e.target.closest('input, select, textarea, [contenteditable]')) return;
    const key = e.key.length === 1 ? e.key.toLowerCase() : e.key;
    if (KEYS[key] && state.current !== null) act(state.current, KEYS[key]);
    else if (key === 'ArrowRight' || key === 'l') move(1);
    else if (key === 'ArrowLeft' || key === 'j') move(-1);
    else if (key === 'n') turn(1);
    else if (key === 'p') turn(-1);
    else return;
    e.preventDefault();
  });

  window.addEventListener('storage', (e) => {  // another tab of the same report decided
    if (e.key === store.key) {
      store.load();
      render(false);
    }
  });

  setupControls();
  drawMatrix();
  render(false);
})();

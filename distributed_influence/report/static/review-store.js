/* The decisions of the label review: kept in localStorage, checked, and written as decisions.csv.
 *
 * Loaded before review.js (the gallery and its controls), which uses it as window.ReviewStore.
 * Apart from the gallery, so that what reaches decisions.csv, the input of apply-review, is
 * decided in one place.
 *
 * Train ids are strings of decimal digits here, as in review-data.js: they are int64, and a
 * JavaScript number holds integers exactly only up to 2^53, so Number(id) could name another
 * example. Decisions are keyed by that string and exported as it is; ids are ordered as BigInt.
 *
 * Decisions are kept under the audit's run key, so a reload loses nothing and the reports of two
 * audits never mix (every file:// page shares one origin in Chromium). A stored entry is checked
 * as apply-review checks a line of decisions.csv, because apply-review refuses the whole file
 * for one bad line: an entry damaged in storage (or by hand) is left out on load, and said so.
 */
(function () {
  'use strict';

  const ACTIONS = ['keep', 'relabel', 'remove', 'unsure'];
  const ID = /^-?\d+$/;

  /** Two ids (strings) in the order of the integers they are, exactly (BigInt, not Number). */
  function compareIds(a, b) {
    const x = BigInt(a);
    const y = BigInt(b);
    return x < y ? -1 : x > y ? 1 : 0;
  }

  /** RFC 4180: a field with a comma, a quote, a line break or outer spaces is quoted (keys are file names). */
  function csvField(v) {
    if (v === null || v === undefined) return '';
    const s = String(v);
    return /[",\r\n]/.test(s) || s.trim() !== s ? '"' + s.replace(/"/g, '""') + '"' : s;
  }

  /**
   * The decisions of one audit's review.
   *
   * @param {object} data window.REVIEW_DATA: its run key, number of classes, whether ids have keys.
   * @param {function(string)} note shows the reviewer a message about storage.
   */
  function ReviewStore(data, note) {
    const key = 'distributed-influence/review/' + (data.run_key || 'page:' + location.pathname);
    let memoryOnly = false;
    let decisions = {};

    /** Whether a decision would pass apply-review: an integer id and label, a known action, and
     *  for a relabel a new class of the model other than the given label. */
    function valid(id, d) {
      if (!ID.test(id) || !d || typeof d !== 'object' || !ACTIONS.includes(d.action)) return false;
      if (!Number.isInteger(d.label)) return false;
      if (d.key !== undefined && d.key !== null && typeof d.key !== 'string') return false;
      return d.action !== 'relabel' || (Number.isInteger(d.new_label) && d.new_label >= 0 &&
        d.new_label < data.n_classes && d.new_label !== d.label);
    }

    function load() {
      let stored = {};
      try {
        const parsed = JSON.parse(window.localStorage.getItem(key) || 'null');
        if (parsed && parsed.decisions && typeof parsed.decisions === 'object') stored = parsed.decisions;
      } catch (e) {  // storage off (a privacy setting) or a damaged entry: keep decisions in memory
        memoryOnly = true;
      }
      const entries = Object.entries(stored);
      decisions = Object.fromEntries(entries.filter(([id, d]) => valid(id, d)));
      const dropped = entries.length - Object.keys(decisions).length;
      if (dropped) note(dropped + ' stored decision(s) of this page were damaged and are left out.');
    }

    function save() {
      if (memoryOnly) {
        note('This browser does not keep data for this page: export your decisions before closing it.');
        return;
      }
      try {
        window.localStorage.setItem(key, JSON.stringify({format: 1, decisions: decisions}));
      } catch (e) {
        memoryOnly = true;
        note('Decisions could not be saved in this browser (' + e.name + '): export them before closing the page.');
      }
    }

    /** decisions.csv: a header line, then one row per decision in audit_rank order (then id). */
    function csv() {
      const head = ['train_id', 'label', 'action', 'new_label']
        .concat(data.has_keys ? ['train_key'] : [], ['decided_at']);
      const rows = Object.entries(decisions)
        .sort(([a, x], [b, y]) => ((x.rank || Infinity) - (y.rank || Infinity)) || compareIds(a, b))
        .map(([id, d]) => [id, d.label, d.action, d.action === 'relabel' ? d.new_label : '']
          .concat(data.has_keys ? [d.key] : [], [d.decided_at]));
      return [head].concat(rows).map((r) => r.map(csvField).join(',')).join('\n') + '\n';
    }

    load();
    return {
      key: key,
      load: load,
      csv: csv,
      get: (id) => decisions[id],
      count: () => Object.keys(decisions).length,
      set(id, d) {
        if (!valid(id, d)) return false;
        decisions[id] = d;
        save();
        return true;
      },
      forget(id) {
        if (!decisions[id]) return false;
        delete decisions[id];
        save();
        return true;
      },
      clear() {
        decisions = {};
        save();
      },
    };
  }

  window.ReviewStore = ReviewStore;
})();

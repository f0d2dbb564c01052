// The posture trend: a line of a framework's daily score drawn in SVG, with
// an accessible name and summary, and the same numbers as a table (charts
// alone hide their values from screen readers and from copying).

import { h, table } from "../console.js";

const WIDTH = 720;
const HEIGHT = 220;
const LEFT = 44;
const RIGHT = 12;
const TOP = 12;
const BOTTOM = 30;

/** "3 Dec" for a UTC day "2026-12-03" (the trend's days are UTC days). */
export function dayLabel(date) {
  return new Date(`${date}T00:00:00Z`).toLocaleDateString(undefined, {
    day: "numeric", month: "short", timeZone: "UTC",
  });
}

/** The framework's entry on each day (null where the site did not use it). */
export function series(days, frameworkId) {
  return days.map((day) => ({
    date: day.date,
    point: day.frameworks.find((f) => f.framework_id === frameworkId) || null,
  }));
}

/** A sentence saying what the chart shows, for its accessible description. */
function summary(points) {
  const scored = points.filter((p) => p.point?.score !== null && p.point?.score !== undefined);
  if (!scored.length) return "No day in the period had evidence to score.";
  const first = scored[0];
  const last = scored[scored.length - 1];
  const low = scored.reduce((a, b) => (b.point.score < a.point.score ? b : a));
  return `Score ${first.point.score}% on ${dayLabel(first.date)}, ${last.point.score}% on ${dayLabel(last.date)}; `
    + `lowest ${low.point.score}% on ${dayLabel(low.date)}. ${points.length - scored.length} of ${points.length} days had nothing to score.`;
}

/**
 * The chart: score (0–100 %) per day as a line, broken where a day had
 * nothing to score; days with a failing control marked below the axis.
 */
export function trendChart({ title, points }) {
  const plotWidth = WIDTH - LEFT - RIGHT;
  const plotHeight = HEIGHT - TOP - BOTTOM;
  const step = points.length > 1 ? plotWidth / (points.length - 1) : 0;
  const x = (i) => LEFT + (points.length > 1 ? i * step : plotWidth / 2);
  const y = (score) => TOP + plotHeight - (plotHeight * score) / 100;
  const id = `trend-${Math.random().toString(36).slice(2, 8)}`;
  const svg = h("svg", {
    class: "chart trend-chart", viewBox: `0 0 ${WIDTH} ${HEIGHT}`, role: "img",
    "aria-labelledby": `${id}-title`, "aria-describedby": `${id}-desc`,
    preserveAspectRatio: "xMidYMid meet",
  }, h("title", { id: `${id}-title` }, title), h("desc", { id: `${id}-desc` }, summary(points)));

  for (const level of [0, 25, 50, 75, 100]) {
    svg.append(
      h("line", { x1: LEFT, x2: WIDTH - RIGHT, y1: y(level), y2: y(level), class: level ? "trend-grid" : "trend-axis" }),
      h("text", { x: LEFT - 6, y: y(level) + 4, "text-anchor": "end", class: "chart-label" }, `${level}%`),
    );
  }
  // Failing days: a tick under the axis, so a bad day is visible even at 0 %.
  points.forEach((p, i) => {
    if (p.point && (p.point.counts.failing || p.point.counts.error)) {
      svg.append(h("rect", { x: x(i) - Math.max(step / 2 - 0.5, 1), y: TOP + plotHeight + 3, width: Math.max(step - 1, 2), height: 5, class: "trend-failing" }));
    }
  });
  // The line, in runs of consecutive scored days.
  let run = [];
  const flush = () => {
    if (run.length > 1) {
      const base = y(0);
      svg.append(
        h("path", { class: "trend-area", d: `M${run[0][0]},${base} ${run.map(([a, b]) => `L${a},${b}`).join(" ")} L${run[run.length - 1][0]},${base} Z` }),
        h("polyline", { class: "trend-line", points: run.map(([a, b]) => `${a},${b}`).join(" ") }),
      );
    } else if (run.length === 1) {
      svg.append(h("circle", { class: "trend-dot", cx: run[0][0], cy: run[0][1], r: 3 }));
    }
    run = [];
  };
  points.forEach((p, i) => {
    const score = p.point?.score;
    if (score === null || score === undefined) flush();
    else run.push([Math.round(x(i) * 10) / 10, Math.round(y(score) * 10) / 10]);
  });
  flush();
  const last = points.length - 1;
  const lastScore = points[last]?.point?.score;
  if (lastScore !== null && lastScore !== undefined) {
    svg.append(h("circle", { class: "trend-dot", cx: x(last), cy: y(lastScore), r: 4 }));
  }
  // Dates: first, middle and last day.
  const marks = [...new Set([0, Math.floor(last / 2), last])].filter((i) => i >= 0);
  for (const i of marks) {
    const anchor = i === 0 ? "start" : i === last ? "end" : "middle";
    svg.append(h("text", { x: x(i), y: HEIGHT - 6, "text-anchor": anchor, class: "chart-label" }, dayLabel(points[i].date)));
  }
  return svg;
}

/** The chart's numbers, newest day first. */
export function trendTable({ caption, points }) {
  const rows = [...points].reverse();
  const count = (name) => ({ label: name[0].toUpperCase() + name.slice(1), class: "num", cell: (p) => (p.point ? String(p.point.counts[name]) : "–") });
  return table({
    caption,
    columns: [
      { label: "Day (UTC)", cell: (p) => h("time", { datetime: p.date }, p.date) },
      { label: "Score", class: "num", cell: (p) => (p.point?.score ?? null) === null ? "–" : `${p.point.score}%` },
      count("passing"), count("failing"), count("error"), count("stale"), count("manual"),
    ],
    rows,
  });
}

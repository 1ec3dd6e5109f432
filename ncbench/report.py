"""Leaderboards (markdown, CSV, LaTeX) and noise-stability plots, read from result records only.

A table holds the runs of one *setting*: dataset, noise protocol, model and its weights (with the
embedded pretraining recipe), epochs, model-selection rule and test protocol; nothing is averaged across
settings. Its rows are method variants (a method with one version, one set of hyper-parameters and
harness settings), its columns noise ratios; a cell is the mean ± sample standard deviation (ddof=1) of
the metric over seeds, with the seed count. Methods that use clean data form a separate track.
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ncbench.errors import UserError
from ncbench.evaluate import METRICS
from ncbench.results import iter_records
from ncbench.seeding import stable_hash

SETTING = ("dataset", "noise_protocol", "model", "architecture", "pretrained", "pretrain", "epochs", "selection")
NOT_VARIANT = SETTING + ("method", "noise", "seed", "preset")  # the preset's name is not part of a run's identity
SELECTION_NAMES = {"best-dev-rsum": "best dev rSum", "last": "last epoch"}
TRACKS = {False: "noisy data only", True: "uses clean data"}
FORMATS = ("md", "csv", "latex")
STD_NOTE = "sample standard deviation (ddof=1) over seeds"


def load_runs(root: Path, dataset: str | None = None) -> pd.DataFrame:
    """One row per complete record under ``root`` (optionally of one dataset): setting, method variant,
    noise ratio, seed, test metrics and the last epoch's detection AUROC."""
    rows = []
    for record in iter_records(root):
        cfg = record["config"]
        last = record["epochs"][-1] if record["epochs"] else {}
        auroc = (last.get("detection") or {}).get("auroc")  # null where undefined (every pair clean)
        rows.append({
            "run_id": record["run_id"],
            "dataset": record["dataset"]["name"],
            "noise_protocol": record["noise"]["protocol"],
            "model": cfg["model"],
            "architecture": cfg.get("architecture", ""),
            "pretrained": cfg["pretrained"],
            "pretrain": json.dumps(cfg["pretrain"], sort_keys=True, separators=(",", ":")) if cfg.get("pretrain") else "",
            "epochs": cfg["epochs"],
            "selection": record["selection"]["rule"],
            "test_protocols": tuple(record["dataset"]["test_protocols"]),
            "method": record["method"]["name"],
            "clean_track": bool(record["method"]["uses_clean_subset"]),
            "variant": json.dumps({k: v for k, v in cfg.items() if k not in NOT_VARIANT}, sort_keys=True),
            "noise": float(record["noise"]["ratio"]),
            "seed": int(cfg["seed"]),
            "test": record["test"],
            "auroc": math.nan if auroc is None else auroc,
        })
    if not rows:
        raise UserError(f"--results {root}: no complete records (result.json) found")
    frame = pd.DataFrame(rows)
    twice = frame.run_id[frame.run_id.duplicated()]
    if len(twice):
        raise UserError(f"--results {root}: run {twice.iloc[0]} has more than one record; keep one copy")
    if dataset is not None:
        if dataset not in set(frame.dataset):
            raise UserError(f"--dataset {dataset!r}: no records; datasets under {root}: {', '.join(sorted(set(frame.dataset)))}")
        frame = frame[frame.dataset == dataset]
    return frame


@dataclass
class Table:
    """One setting's aggregate: ``stats`` is indexed by (clean_track, label, noise) with mean, std, n."""

    setting: dict
    protocol: str
    metric: str
    stats: pd.DataFrame

    @property
    def noise(self) -> list[float]:
        return sorted(set(self.stats.index.get_level_values("noise")))

    @property
    def seeds(self) -> int:
        """The largest seed count of a cell; cells with fewer are marked."""
        return int(self.stats.n.max())

    @property
    def slug(self) -> str:
        """A file-name-safe, unique and stable name of the setting and test protocol."""
        s = self.setting
        readable = f"{s['dataset']}_{s['noise_protocol']}_{s['model']}_{s['epochs']}ep_{self.protocol}"
        safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in readable)
        return f"{safe}_{stable_hash(self.setting, self.protocol, length=6)}"

    def setting_parts(self) -> list[str]:
        """The setting in words, for titles and captions."""
        s = self.setting
        weights = s["pretrained"]
        if s["pretrain"]:
            spec = json.loads(s["pretrain"])
            weights += f", pretrained on {spec['corpus_images']} images for {_plural(spec['epochs'], 'epoch')}"
        return [s["dataset"], f"{s['noise_protocol']} noise", f"{s['model']} ({weights})",
                f"{_plural(s['epochs'], 'epoch')}", f"model selection: {SELECTION_NAMES.get(s['selection'], s['selection'])}",
                f"test protocol {self.protocol}"]

    def rows(self, clean_track: bool) -> list[str]:
        index = self.stats.index
        return sorted(set(index[index.get_level_values("clean_track") == clean_track].get_level_values("label")))

    def cell(self, clean_track: bool, label: str, noise: float) -> tuple[float, float, int] | None:
        key = (clean_track, label, noise)
        if key not in self.stats.index:
            return None
        row = self.stats.loc[key]
        return float(row["mean"]), float(row["std"]), int(row["n"])

    def best(self, clean_track: bool, noise: float) -> float | None:
        """The best mean of a column within a track (None when the track has fewer than two entries there)."""
        means = [c[0] for c in (self.cell(clean_track, label, noise) for label in self.rows(clean_track)) if c]
        if len(means) < 2:
            return None
        return max(means) if METRICS.get(self.metric, True) else min(means)


def tables(frame: pd.DataFrame, metric: str, protocol: str | None = None) -> list[Table]:
    """The leaderboard tables of ``metric`` on ``protocol`` (default: each dataset's first test protocol)."""
    out = []
    for key, runs in frame.groupby(list(SETTING), sort=True):
        offered = runs.test_protocols.iloc[0]
        chosen = protocol or offered[0]
        if chosen not in offered:
            raise UserError(f"--protocol {chosen}: dataset {runs.dataset.iloc[0]} has test protocols "
                            f"{', '.join(offered)} (choose one, or pick a dataset with --dataset)")
        values = runs.test.map(lambda test: test[chosen].get(metric, math.nan))
        if values.isna().any():
            available = sorted(set.intersection(*(set(t[chosen]) for t in runs.test)))
            raise UserError(f"--metric {metric!r}: expected one of {', '.join(available)}")
        out.append(_table(dict(zip(SETTING, key)), chosen, metric, runs.assign(value=values)))
    return out


def detection_tables(frame: pd.DataFrame) -> list[Table]:
    """Per setting, the last epoch's clean-pair detection AUROC of the method variants that report it."""
    out = []
    for key, runs in frame.groupby(list(SETTING), sort=True):
        reported = runs.assign(value=runs.auroc).dropna(subset=["value"])
        if len(reported):
            out.append(_table(dict(zip(SETTING, key)), runs.test_protocols.iloc[0][0], "auroc", reported))
    return out


def _table(setting: dict, protocol: str, metric: str, runs: pd.DataFrame) -> Table:
    runs = runs.assign(label=_labels(runs))
    stats = runs.groupby(["clean_track", "label", "noise"]).value.agg(
        mean="mean", std=lambda v: v.std(ddof=1), n="count")
    return Table(setting, protocol, metric, stats)


def _labels(runs: pd.DataFrame) -> pd.Series:
    """The method's name; where one method has several variants in a table, plus the settings that differ."""
    labels = runs.method.copy()
    for method, group in runs.groupby("method"):
        variants = {v: _flatten(json.loads(v)) for v in group.variant.unique()}
        if len(variants) < 2:
            continue
        differ = sorted(k for k in set().union(*variants.values()) if len({repr(d.get(k)) for d in variants.values()}) > 1)
        for variant, values in variants.items():
            text = ", ".join(f"{k}={_value(values.get(k))}" for k in differ)
            labels[(runs.method == method) & (runs.variant == variant)] = f"{method} ({text})"
    return labels


def _flatten(variant: dict) -> dict:
    params = variant.pop("params", {}) or {}
    flat = {("version" if k == "method_version" else k): v for k, v in variant.items()}
    return {**flat, **{f"param.{k}": v for k, v in params.items()}}


def _value(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def metric_name(metric: str) -> str:
    """``rsum`` -> rSum, ``i2t_r1`` -> I2T R@1, ``t2i_medr`` -> T2I MedR, ``auroc`` -> AUROC."""
    if metric == "rsum":
        return "rSum"
    direction, _, what = metric.partition("_")
    if not what:
        return metric.upper()
    return f"{direction.upper()} " + ("MedR" if what == "medr" else what.upper().replace("R", "R@", 1))


def _percent(noise: float) -> str:
    return f"{100 * noise:.4g}%"


def _cell_text(cell: tuple[float, float, int] | None, seeds: int, pm: str) -> str:
    if cell is None:
        return "–"
    mean, std, n = cell
    text = f"{mean:.1f}" if n < 2 else f"{mean:.1f}{pm}{std:.1f}"
    return text + (f" (n={n})" if n < seeds else "")


def _footnote(table: Table) -> str:
    better = "higher" if METRICS.get(table.metric, True) else "lower"
    return (f"Mean ± {STD_NOTE}: {table.seeds} per cell, (n=k) marks a cell with fewer; one seed has no std. "
            f"Bold: the best mean of its column within its track ({better} is better).")


def markdown(tabs: list[Table]) -> str:
    """The leaderboard as markdown: one section per setting, one table per track."""
    metric = metric_name(tabs[0].metric)
    parts = [f"# Leaderboard: test {metric}\n"]
    for table in tabs:
        parts.append(f"## {' · '.join(table.setting_parts())}\n")
        for clean in (False, True):
            rows = table.rows(clean)
            if not rows:
                continue
            if clean:
                parts.append("Methods that use clean data (a separate track):\n")
            header = ["Method", *(f"noise {_percent(r)}" for r in table.noise)]
            lines = ["| " + " | ".join(header) + " |", "| :-- |" + " --: |" * len(table.noise)]
            for label in rows:
                cells = []
                for ratio in table.noise:
                    cell = table.cell(clean, label, ratio)
                    text = _cell_text(cell, table.seeds, " ± ")
                    cells.append(f"**{text}**" if cell and cell[0] == table.best(clean, ratio) else text)
                lines.append("| " + " | ".join([label, *cells]) + " |")
            parts.append("\n".join(lines) + "\n")
        parts.append(f"Test {metric}. {_footnote(table)}\n")
    return "\n".join(parts)


def csv(tabs: list[Table]) -> str:
    """The leaderboard as one CSV: a row per (setting, track, method variant), three columns per noise ratio."""
    noise = sorted({r for t in tabs for r in t.noise})
    rows = []
    for table in tabs:
        for clean in (False, True):
            for label in table.rows(clean):
                row = {**{k: table.setting[k] for k in SETTING}, "test_protocol": table.protocol,
                       "metric": table.metric, "track": TRACKS[clean], "method": label}
                for ratio in noise:
                    cell = table.cell(clean, label, ratio)
                    row.update({f"noise{ratio:g}_mean": cell[0] if cell else math.nan,
                                f"noise{ratio:g}_sample_std": cell[1] if cell else math.nan,
                                f"noise{ratio:g}_seeds": cell[2] if cell else None})
                rows.append(row)
    frame = pd.DataFrame(rows)
    for ratio in noise:
        frame[f"noise{ratio:g}_seeds"] = frame[f"noise{ratio:g}_seeds"].astype("Int64")
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False, float_format="%.4f", lineterminator="\n")
    return buffer.getvalue()


_TEX = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
        "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}"}


def tex_escape(text: str) -> str:
    """``text`` with LaTeX's special characters escaped."""
    return "".join(_TEX.get(c, c) for c in text)


def latex(tabs: list[Table]) -> str:
    """The leaderboard as LaTeX (booktabs): one ``table`` per setting, the clean-data track as its own block."""
    out = ["% ncbench leaderboard; needs \\usepackage{booktabs}"]
    for table in tabs:
        k = len(table.noise)
        better = "higher" if METRICS.get(table.metric, True) else "lower"
        caption = (f"Test {tex_escape(metric_name(table.metric))}: {tex_escape('; '.join(table.setting_parts()))}. "
                   f"Mean $\\pm$ {STD_NOTE} ({table.seeds} per cell; (n=k) marks a cell with fewer, "
                   f"one seed has no std). Bold: best mean of its column within its track ({better} is better).")
        out += ["", "\\begin{table}[t]", "\\centering", f"\\caption{{{caption}}}",
                f"\\label{{tab:ncbench-{table.slug}}}", f"\\begin{{tabular}}{{l{'c' * k}}}", "\\toprule",
                f" & \\multicolumn{{{k}}}{{c}}{{Noise ratio}} \\\\", f"\\cmidrule(lr){{2-{k + 1}}}",
                "Method & " + " & ".join(tex_escape(_percent(r)) for r in table.noise) + " \\\\", "\\midrule"]
        for clean in (False, True):
            rows = table.rows(clean)
            if not rows:
                continue
            if clean:
                out += ["\\midrule", f"\\multicolumn{{{k + 1}}}{{l}}{{\\textit{{Methods that use clean data}}}} \\\\"]
            for label in rows:
                cells = []
                for ratio in table.noise:
                    cell = table.cell(clean, label, ratio)
                    text = _cell_text(cell, table.seeds, " \\pm ")
                    if cell is not None:
                        value, _, marker = text.partition(" (")
                        value = f"\\mathbf{{{value}}}" if cell[0] == table.best(clean, ratio) else value
                        text = f"${value}$" + (f" ({marker}" if marker else "")
                    cells.append(text)
                out.append(" & ".join([tex_escape(label), *cells]) + " \\\\")
        out += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    return "\n".join(out) + "\n"


RENDERERS = {"md": markdown, "csv": csv, "latex": latex}


def leaderboard(root: Path, fmt: str = "md", metric: str = "rsum", protocol: str | None = None,
                dataset: str | None = None) -> str:
    """The leaderboard of the records under ``root`` as text in format ``fmt``."""
    if fmt not in RENDERERS:
        raise UserError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    return RENDERERS[fmt](tables(load_runs(root, dataset), metric, protocol))


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", "-.", ":")
COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")  # Okabe–Ito


def plot(root: Path, out_dir: Path, metric: str = "rsum", protocol: str | None = None,
         dataset: str | None = None) -> list[Path]:
    """Per setting, the noise-stability plot of ``metric`` and, where methods report it, the detection AUROC plot;
    each as PNG and SVG in ``out_dir``. Returns the files written."""
    frame = load_runs(root, dataset)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for table in tables(frame, metric, protocol):
        written += _figure(table, f"test {metric_name(metric)} (protocol {table.protocol})",
                           f"Noise stability: test {metric_name(metric)}", out_dir / f"{table.slug}_{metric}")
    for table in detection_tables(frame):
        written += _figure(table, "clean-pair detection AUROC (last epoch)", "Clean-pair detection",
                           out_dir / f"{table.slug}_detection-auroc")
    return written


def _figure(table: Table, ylabel: str, title: str, stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.rc_context({"svg.hashsalt": "ncbench", "font.size": 9}):
        fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
        lines = [(clean, label) for clean in (False, True) for label in table.rows(clean)]
        for i, (clean, label) in enumerate(lines):
            cells = [(r, table.cell(clean, label, r)) for r in table.noise]
            x = [100 * r for r, c in cells if c]
            mean = [c[0] for _, c in cells if c]
            std = [c[1] if c[2] > 1 else 0.0 for _, c in cells if c]
            colour = COLOURS[i % len(COLOURS)]
            ax.plot(x, mean, color=colour, marker=MARKERS[i % len(MARKERS)], linestyle=LINESTYLES[i % len(LINESTYLES)],
                    label=label + (" [clean data]" if clean else ""))
            ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color=colour,
                            alpha=0.15, linewidth=0)
        ax.set_xlabel("noise ratio (%)")
        ax.set_ylabel(ylabel)
        ax.set_xticks([100 * r for r in table.noise])
        dataset, noise, model, epochs, selection, _ = table.setting_parts()
        ax.set_title(f"{title}\n{dataset} · {noise} · {epochs} · {selection}\n{model}", fontsize=9)
        ax.grid(True, color="0.85", linewidth=0.6)
        ax.legend(fontsize=8, title=f"band: ± sample std over seeds (ddof=1), n ≤ {table.seeds}", title_fontsize=8)
        paths = [stem.parent / f"{stem.name}.png", stem.parent / f"{stem.name}.svg"]
        fig.savefig(paths[0], dpi=150, metadata={"Software": None})
        fig.savefig(paths[1], metadata={"Date": None})
        plt.close(fig)
    return paths

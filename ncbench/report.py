"""Leaderboards (markdown, CSV, LaTeX), method comparisons, noise-stability and critical-difference plots, read
from result records only.

A table holds the runs of one *setting*: dataset, noise protocol, model and its weights (with the
embedded pretraining recipe), epochs, model-selection rule and test protocol; nothing is averaged across
settings. Its rows are method variants (a method with one version, one set of hyper-parameters and
harness settings), its columns noise ratios; a cell is the mean of the metric over seeds with its 95 %
interval and the seed count, bold when in the column's tied-best group; the statistics are in ncbench/verdicts.py
and docs/statistics.md. Methods that use clean data form a separate track.
"""
from __future__ import annotations

import io
import json
import math
import zipfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from ncbench import stats
from ncbench.errors import UserError
from ncbench.evaluate import METRICS
from ncbench.results import RECORD, iter_records, load_ranks
from ncbench.seeding import stable_hash
from ncbench.stats import Estimate
from ncbench.verdicts import Evidence, Key

SETTING = ("dataset", "noise_protocol", "model", "architecture", "pretrained", "pretrain", "epochs", "selection")
NOT_VARIANT = SETTING + ("method", "noise", "seed", "preset")  # the preset's name is not part of a run's identity
SELECTION_NAMES = {"best-dev-rsum": "best dev rSum", "last": "last epoch"}
TRACKS = {False: "noisy data only", True: "uses clean data"}
FORMATS = ("md", "csv", "latex")
RUN_COLUMNS = ("clean_track", "label", "noise", "seed", "digest", "value", "ranks")
TESTS = {"t": "paired t", "bootstrap": "paired bootstrap", "welch": "Welch (unpaired)", "": "–"}
INTERVALS = {"t": "Student t over seeds", "bootstrap": "bootstrap over seeds and test queries"}
COMPARE_FORMATS = ("table", "csv", "md")


def load_runs(root: Path, dataset: str | None = None) -> pd.DataFrame:
    """One row per complete record under ``root`` (optionally of one dataset): setting, method variant,
    noise ratio, seed, noise digest, test metrics, per-query test ranks (or None) and the last epoch's detection AUROC;
    plus the noise-free runs each noise protocol shares (:func:`share_noise_free`)."""
    rows = []
    run_dirs: dict[str, Path] | None = None
    for record in iter_records(root):
        ranks = None
        if record.get("ranks_file"):
            run_dirs = run_dirs if run_dirs is not None else {p.parent.name: p.parent for p in Path(root).rglob(RECORD)}
            run_dir = run_dirs.get(record["run_id"], Path(root) / record["run_id"])
            try:
                ranks = load_ranks(run_dir, record)
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
                raise UserError(f"--results {root}: {run_dir / record['ranks_file']} is not a readable ranks file ({e})") from None
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
            "digest": record["noise"].get("digest", ""),
            "test": record["test"],
            "ranks": ranks,
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
    return share_noise_free(frame)


def share_noise_free(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` (``shared`` False) and, for each noise protocol of a setting, copies of the setting's 0 % runs
    recorded under another protocol (``shared`` True) of the method variants it has runs of, where it has none of its
    own of that variant and seed.

    At 0 % every protocol leaves the pairs as they are: the run is the same computation, with the same numbers,
    whichever protocol names it. So one noise-free run per method and seed serves every protocol's table, its AUC
    and retention (docs/noise.md#noise-free-runs).
    """
    rest = [c for c in SETTING if c != "noise_protocol"]
    run = ["method", "variant", "seed"]
    copies = []
    for _, group in frame.groupby(rest, sort=False):
        zero = group[group.noise == 0].sort_values("noise_protocol", kind="stable")
        for protocol in sorted(set(group.noise_protocol)):
            variants = set(map(tuple, group.loc[group.noise_protocol == protocol, run[:2]].to_numpy()))
            own = set(map(tuple, zero.loc[zero.noise_protocol == protocol, run].to_numpy()))
            borrowed = zero[zero.noise_protocol != protocol].drop_duplicates(subset=run)
            borrowed = borrowed[[tuple(key[:2]) in variants and tuple(key) not in own
                                 for key in borrowed[run].to_numpy()]]
            if len(borrowed):
                copies.append(borrowed.assign(noise_protocol=protocol, shared=True))
    return pd.concat([frame.assign(shared=False), *copies], ignore_index=True)


class Cell(NamedTuple):
    """A table cell: mean over seeds, sample std, seed count, 95 % interval and membership of the tied-best group."""

    mean: float
    std: float
    n: int
    lo: float
    hi: float
    best: bool


@dataclass
class Table:
    """One setting's runs (``RUN_COLUMNS``, ``value`` being the metric) and the statistics drawn from them."""

    setting: dict
    protocol: str
    metric: str
    runs: pd.DataFrame

    @property
    def noise(self) -> list[float]:
        return sorted(set(self.runs.noise))

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

    @property
    def higher_is_better(self) -> bool:
        return METRICS.get(self.metric, True)

    @cached_property
    def evidence(self) -> Evidence:
        return self.evidence_of(set(self.runs.label))

    def evidence_of(self, labels: set[str]) -> Evidence:
        """The evidence of these rows' runs alone; each run's bootstrap draws depend on the test set only, so its
        figures are the whole table's without resampling the other rows."""
        runs = self.runs[self.runs.label.isin(labels)]
        return Evidence(runs[list(RUN_COLUMNS)], self.metric, self.higher_is_better)

    @cached_property
    def stats(self) -> pd.DataFrame:
        """Indexed by (clean_track, label, noise): mean, std, n, lo, hi, best (in the tied-best group), how."""
        rows = []
        for (clean, noise), runs in self.runs.groupby(["clean_track", "noise"]):
            keys = [(bool(clean), label) for label in sorted(set(runs.label))]
            group = self.evidence.best_group(keys, noise) if len(keys) > 1 else set()
            for key in keys:
                e = self.evidence.cell(key, noise)
                rows.append({"clean_track": key[0], "label": key[1], "noise": noise, "mean": e.value,
                             "std": runs.value[runs.label == key[1]].std(ddof=1), "n": e.n, "lo": e.lo, "hi": e.hi,
                             "best": key in group, "how": e.how})
        return pd.DataFrame(rows).set_index(["clean_track", "label", "noise"]).sort_index()

    @cached_property
    def robustness(self) -> dict[Key, tuple[Estimate, Estimate]]:
        """Per row: area under the noise-stability curve and retention (nan without ratio 0); empty for one ratio."""
        if len(self.noise) < 2:
            return {}
        return {(clean, label): self.evidence.robustness((clean, label), self.noise)
                for clean in (False, True) for label in self.rows(clean)}

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
        runs = self.runs
        return sorted(set(runs.label[runs.clean_track == clean_track]))

    def cell(self, clean_track: bool, label: str, noise: float) -> Cell | None:
        key = (clean_track, label, noise)
        if key not in self.stats.index:
            return None
        row = self.stats.loc[key]
        return Cell(float(row["mean"]), float(row["std"]), int(row["n"]), float(row["lo"]), float(row["hi"]),
                    bool(row["best"]))

    def intervals(self) -> str:
        """How this table's cell intervals were made, in words."""
        return " or ".join(INTERVALS[h] for h in sorted(set(self.stats.how) - {""}, reverse=True)) or "none"


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
        reported = runs.assign(value=runs.auroc, ranks=None).dropna(subset=["value"])
        if len(reported):
            out.append(_table(dict(zip(SETTING, key)), runs.test_protocols.iloc[0][0], "auroc", reported))
    return out


def _table(setting: dict, protocol: str, metric: str, runs: pd.DataFrame) -> Table:
    names = (f"{protocol}.i2t", f"{protocol}.t2i")
    ranked = metric == "rsum" or metric.startswith(("i2t_", "t2i_"))
    ranks = [(r[names[0]], r[names[1]]) if ranked and r and all(n in r for n in names) else None for r in runs.ranks]
    sizes = {(len(r[0]), len(r[1])) for r in ranks if r is not None}
    if len(sizes) > 1:
        raise UserError(f"ranks files of {', '.join(setting[k] for k in ('dataset', 'noise_protocol'))}, test protocol "
                        f"{protocol}: query counts differ between runs ({', '.join(map(str, sorted(sizes)))})")
    return Table(setting, protocol, metric, runs.assign(label=_labels(runs), ranks=pd.Series(ranks, runs.index, object)))


def _labels(runs: pd.DataFrame) -> pd.Series:
    """The method's name; where one method has several variants in a table, the settings that differ follow the
    name of every variant but the method's default (``ncbench run --method <name>`` without flags), so an ablation
    adds a row without renaming the method's own."""
    labels = runs.method.copy()
    for method, group in runs.groupby("method"):
        variants = {v: _flatten(json.loads(v)) for v in group.variant.unique()}
        if len(variants) < 2:
            continue
        default = default_variant(method)
        differ = sorted(k for k in set().union(*variants.values()) if len({repr(d.get(k)) for d in variants.values()}) > 1)
        for variant, values in variants.items():
            if variant != default:
                text = ", ".join(f"{k}={_value(values.get(k))}" for k in differ)
                labels[(runs.method == method) & (runs.variant == variant)] = f"{method} ({text})"
    return labels


def default_variant(method: str) -> str | None:
    """The variant (as :func:`load_runs` writes it) of a run of ``method`` with every setting at its default; None
    for a method not registered here (a plugin's records read without the plugin)."""
    from ncbench.config import resolve
    from ncbench.registry import METHODS

    try:
        fields = resolve(METHODS.get(method), {}).named_fields()
    except UserError:
        return None
    return json.dumps({k: v for k, v in fields.items() if k not in NOT_VARIANT}, sort_keys=True)


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


ROBUST = {"auc": "AUC", "retention": "retention %"}


def _robust_columns(table: Table) -> list[str]:
    """The robustness columns of a table: AUC needs two noise ratios, retention also ratio 0."""
    if len(table.noise) < 2:
        return []
    return ["auc"] + (["retention"] if table.noise[0] == 0 else [])


def _robust(table: Table, clean: bool, label: str, column: str) -> Estimate:
    return table.robustness[(clean, label)][list(ROBUST).index(column)]


def _text(value: float, lo: float, hi: float, n: int, seeds: int, *, bold: bool = False, tex: bool = False,
          scale: float = 1.0) -> str:
    """A mean with its 95 % interval (none below two seeds) and (n=k) where fewer than ``seeds`` seeds."""
    if math.isnan(value):
        return "–"
    mean = f"{scale * value:.1f}"
    interval = f"[{scale * lo:.1f}, {scale * hi:.1f}]" if n >= 2 and not math.isnan(lo) else ""
    marker = f"(n={n})" if n < seeds else ""
    if tex:
        mean = f"$\\mathbf{{{mean}}}$" if bold else f"${mean}$"
        return " ".join(t for t in (mean, f"{{\\scriptsize {interval}}}" if interval else "", marker) if t)
    text = " ".join(t for t in (mean, interval, marker) if t)
    return f"**{text}**" if bold else text


def _cell_text(table: Table, clean: bool, label: str, ratio: float, tex: bool = False) -> str:
    cell = table.cell(clean, label, ratio)
    if cell is None:
        return "–"
    return _text(cell.mean, cell.lo, cell.hi, cell.n, table.seeds, bold=cell.best, tex=tex)


def _robust_text(table: Table, clean: bool, label: str, column: str, tex: bool = False) -> str:
    e = _robust(table, clean, label, column)
    return _text(e.value, e.lo, e.hi, e.n, table.seeds, tex=tex, scale=100.0 if column == "retention" else 1.0)


def _footnote(table: Table) -> str:
    better = "higher" if table.higher_is_better else "lower"
    text = (f"Mean over seeds [95 % interval: {table.intervals()}]: {table.seeds} per cell, (n=k) marks a cell with "
            f"fewer; one seed has no interval. Bold: the tied-best group of its column within its track: the best mean "
            f"({better} is better) and every method not significantly worse (two-sided tests paired by seed and noise "
            f"artefact, Holm-corrected over the column, α = 0.05; a cell that cannot be tested stays in).")
    columns = _robust_columns(table)
    if columns:
        low, high = _percent(table.noise[0]), _percent(table.noise[-1])
        text += (f" AUC: area under the noise-stability curve from {low} to {high} (trapezoid rule, divided by the "
                 f"span: the curve's mean height)")
        text += f"; retention: the metric at {high} / at 0%, in %" if "retention" in columns else ""
        text += "; both per seed over the seeds run at every ratio, then averaged."
    return text + " See docs/statistics.md."


def markdown(tabs: list[Table]) -> str:
    """The leaderboard as markdown: one section per setting, one table per track."""
    metric = metric_name(tabs[0].metric)
    parts = [f"# Leaderboard: test {metric}\n"]
    for table in tabs:
        parts.append(f"## {' · '.join(table.setting_parts())}\n")
        robust = _robust_columns(table)
        for clean in (False, True):
            rows = table.rows(clean)
            if not rows:
                continue
            if clean:
                parts.append("Methods that use clean data (a separate track):\n")
            header = ["Method", *(f"noise {_percent(r)}" for r in table.noise), *(ROBUST[c] for c in robust)]
            lines = ["| " + " | ".join(header) + " |", "| :-- |" + " --: |" * (len(header) - 1)]
            for label in rows:
                cells = [_cell_text(table, clean, label, r) for r in table.noise]
                cells += [_robust_text(table, clean, label, c) for c in robust]
                lines.append("| " + " | ".join([label, *cells]) + " |")
            parts.append("\n".join(lines) + "\n")
        parts.append(f"Test {metric}. {_footnote(table)}\n")
    return "\n".join(parts)


def csv(tabs: list[Table]) -> str:
    """The leaderboard as one CSV: a row per (setting, track, method variant); per noise ratio the mean, sample std,
    interval, seed count and tied-best membership; then the robustness scores with their intervals."""
    noise = sorted({r for t in tabs for r in t.noise})
    rows = []
    for table in tabs:
        for clean in (False, True):
            for label in table.rows(clean):
                row = {**{k: table.setting[k] for k in SETTING}, "test_protocol": table.protocol,
                       "metric": table.metric, "track": TRACKS[clean], "method": label}
                for ratio in noise:
                    cell = table.cell(clean, label, ratio)
                    values = (cell.mean, cell.std, cell.lo, cell.hi, cell.n, cell.best) if cell else (math.nan,) * 4 + (None, None)
                    row.update(dict(zip((f"noise{ratio:g}_{k}" for k in ("mean", "sample_std", "lo", "hi", "seeds", "group")),
                                        values)))
                for column in ROBUST:
                    e = _robust(table, clean, label, column) if column in _robust_columns(table) else Estimate(math.nan)
                    row.update({column: e.value, f"{column}_lo": e.lo, f"{column}_hi": e.hi, f"{column}_seeds": e.n or None})
                rows.append(row)
    frame = pd.DataFrame(rows)
    for column in [f"noise{r:g}_seeds" for r in noise] + [f"{c}_seeds" for c in ROBUST]:
        frame[column] = frame[column].astype("Int64")
    for ratio in noise:
        frame[f"noise{ratio:g}_group"] = frame[f"noise{ratio:g}_group"].astype("boolean")
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
        robust = _robust_columns(table)
        k, width = len(table.noise), len(table.noise) + len(robust)
        caption = (f"Test {tex_escape(metric_name(table.metric))}: {tex_escape('; '.join(table.setting_parts()))}. "
                   + tex_escape(_footnote(table)).replace("α", r"$\alpha$"))
        out += ["", "\\begin{table}[t]", "\\centering", f"\\caption{{{caption}}}",
                f"\\label{{tab:ncbench-{table.slug}}}", f"\\begin{{tabular}}{{l{'c' * width}}}", "\\toprule",
                f" & \\multicolumn{{{k}}}{{c}}{{Noise ratio}}" + " &" * len(robust) + " \\\\",
                f"\\cmidrule(lr){{2-{k + 1}}}",
                "Method & " + " & ".join([*(tex_escape(_percent(r)) for r in table.noise),
                                          *(tex_escape(ROBUST[c]) for c in robust)]) + " \\\\", "\\midrule"]
        for clean in (False, True):
            rows = table.rows(clean)
            if not rows:
                continue
            if clean:
                out += ["\\midrule", f"\\multicolumn{{{width + 1}}}{{l}}{{\\textit{{Methods that use clean data}}}} \\\\"]
            for label in rows:
                cells = [_cell_text(table, clean, label, r, tex=True) for r in table.noise]
                cells += [_robust_text(table, clean, label, c, tex=True) for c in robust]
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


def compare(root: Path, a: str, b: str, metric: str = "rsum", protocol: str | None = None, dataset: str | None = None,
            noise_protocol: str | None = None) -> pd.DataFrame:
    """Per setting and noise ratio where both methods (leaderboard labels) have runs: the means, the difference
    a - b with its 95 % interval, p-value, Holm-adjusted p-value over the rows, pair count and test used."""
    frame = load_runs(root, dataset)
    if noise_protocol is not None:
        if noise_protocol not in set(frame.noise_protocol):
            raise UserError(f"--noise-protocol {noise_protocol!r}: no records; noise protocols under {root}: "
                            f"{', '.join(sorted(set(frame.noise_protocol)))}")
        frame = frame[frame.noise_protocol == noise_protocol]
    tabs = tables(frame, metric, protocol)
    labels = {label for t in tabs for clean in (False, True) for label in t.rows(clean)}
    for method in (a, b):
        if method not in labels:
            raise UserError(f"compare: method {method!r} has no records here; methods: {', '.join(sorted(labels))}")
    rows = []
    for table in tabs:
        keys = {label: (clean, label) for clean in (False, True) for label in table.rows(clean)}
        if a not in keys or b not in keys:
            continue
        evidence = table.evidence_of({a, b})
        value = evidence.runs.value
        for ratio in table.noise:
            rows_a, rows_b, _ = evidence.compared_runs(keys[a], keys[b], ratio)
            if not rows_a or not rows_b:
                continue
            e = evidence.difference(keys[a], keys[b], ratio)
            rows.append({**table.setting, "test_protocol": table.protocol, "metric": metric, "noise": ratio,
                         "a": a, "b": b, "mean_a": value[rows_a].mean(), "mean_b": value[rows_b].mean(),
                         "difference": e.value, "lo": e.lo, "hi": e.hi, "p": e.p, "pairs": e.n, "test": TESTS[e.how]})
    if not rows:
        raise UserError(f"compare {a} {b}: no setting and noise ratio under {root} has runs of both")
    out = pd.DataFrame(rows)
    out["p_holm"] = stats.holm(out.p.tolist())
    return out


def comparison_rows(frame: pd.DataFrame) -> tuple[str, list[str], list[list[str]]]:
    """A comparison as text: title, header and rows; the setting is a column only where rows differ in it."""
    a, b = frame.a.iloc[0], frame.b.iloc[0]
    settings = [f"{r.dataset} · {r.noise_protocol} noise · {r.model} · {r.epochs} ep · test {r.test_protocol}"
                for r in frame.itertuples()]
    several = len(set(settings)) > 1
    title = f"test {metric_name(frame.metric.iloc[0])}: A = {a}, B = {b}" + ("" if several else f"; {settings[0]}")
    header = [*(["setting"] if several else []), "noise", "mean A", "mean B", "A − B", "95% CI", "p", "p Holm",
              "n", "test"]
    rows = []
    for setting, r in zip(settings, frame.itertuples()):
        interval = "–" if math.isnan(r.lo) else f"[{r.lo:+.2f}, {r.hi:+.2f}]"
        rows.append([*([setting] if several else []), _percent(r.noise), f"{r.mean_a:.2f}", f"{r.mean_b:.2f}",
                     f"{r.difference:+.2f}", interval, _p_text(r.p), _p_text(r.p_holm), str(r.pairs), r.test])
    return title, header, rows


def _p_text(p: float) -> str:
    return "–" if math.isnan(p) else f"{p:.3g}"


def comparison_text(frame: pd.DataFrame, fmt: str) -> str:
    """A comparison as CSV (raw numbers) or markdown."""
    if fmt == "csv":
        buffer = io.StringIO()
        frame.to_csv(buffer, index=False, float_format="%.6g", lineterminator="\n")
        return buffer.getvalue()
    title, header, rows = comparison_rows(frame)
    lines = [f"{title}\n", "| " + " | ".join(header) + " |", "|" + " :-- |" * (len(header) - 8) + " --: |" * 7 + " :-- |"]
    note = ("\nn: seed pairs (fewer runs of A or B for Welch, used where paired runs differ in noise); p Holm: "
            "adjusted over these rows; paired t over seeds, or a bootstrap over seeds and test queries where every run "
            "has ranks (docs/statistics.md).\n")
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n" + note


def rank_blocks(tabs: list[Table]) -> pd.DataFrame:
    """Blocks (setting x test protocol x noise ratio; rows) x methods of the noisy-data track (columns) of the mean:
    the methods present in at least half of the blocks, the blocks that have all of them. Noise-free runs shared by
    several protocols make one block, where they were recorded."""
    blocks = {}
    for table in tabs:
        for ratio in table.noise:
            if table.runs.shared[table.runs.noise == ratio].all():
                continue  # another protocol's table holds these runs' block
            blocks[f"{table.slug} {ratio:g}"] = {label: table.cell(False, label, ratio).mean for label in table.rows(False)
                                                 if table.cell(False, label, ratio) is not None}
    frame = pd.DataFrame.from_dict(blocks, orient="index")
    frame = frame[sorted(c for c in frame.columns if frame[c].notna().mean() >= 0.5)]
    return frame.dropna()


COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")  # Okabe–Ito
MARKERS = ("o", "s", "^", "D", "v", "P", "X")  # 7, coprime with the 8 colours
LINESTYLES = ("-", "--", "-.")  # 3, coprime with both


def line_style(i: int) -> dict:
    """Colour, marker and line style of a plot's ``i``-th line: the cycle lengths are coprime, so no two of the first
    168 lines look alike (the 9th line is not the 1st again)."""
    return {"color": COLOURS[i % len(COLOURS)], "marker": MARKERS[i % len(MARKERS)],
            "linestyle": LINESTYLES[i % len(LINESTYLES)]}


def plot(root: Path, out_dir: Path, metric: str = "rsum", protocol: str | None = None,
         dataset: str | None = None) -> list[Path]:
    """Per setting, the noise-stability plot of ``metric`` and, where methods report it, the detection AUROC plot;
    across settings, the critical-difference diagram of ``metric`` (where three methods share two blocks); each as
    PNG and SVG in ``out_dir``. Returns the files written."""
    frame = load_runs(root, dataset)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    metric_tables = tables(frame, metric, protocol)
    for table in metric_tables:
        written += _figure(table, f"test {metric_name(metric)} (protocol {table.protocol})",
                           f"Noise stability: test {metric_name(metric)}", out_dir / f"{table.slug}_{metric}")
    for table in detection_tables(frame):
        written += _figure(table, "clean-pair detection AUROC (last epoch)", "Clean-pair detection",
                           out_dir / f"{table.slug}_detection-auroc")
    blocks = rank_blocks(metric_tables)
    if blocks.shape[1] >= 3 and blocks.shape[0] >= 2:  # Friedman needs three methods
        written += _cd_figure(stats.rank_test(blocks, METRICS.get(metric, True)), metric,
                              out_dir / f"critical-difference_{metric}")
    return written


def _cd_figure(test: stats.RankTest, metric: str, stem: Path) -> list[Path]:
    """The critical-difference diagram (Demšar 2006) drawn by scikit-posthocs, as PNG and SVG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scikit_posthocs as sp

    with plt.rc_context({"svg.hashsalt": "ncbench", "font.size": 9}):
        fig, ax = plt.subplots(figsize=(6.4, 2.4 + 0.15 * len(test.ranks)), layout="constrained")
        sp.critical_difference_diagram(test.ranks, test.nemenyi, cd=test.cd, alpha=stats.ALPHA, ax=ax,
                                       label_fmt_left="{label} ({rank:.2f})", label_fmt_right="({rank:.2f}) {label}",
                                       color_palette=list(COLOURS[: len(test.ranks)]) if len(test.ranks) <= len(COLOURS) else None)
        fig.suptitle(f"Average rank of test {metric_name(metric)} (1 = best), noisy-data track, over {test.blocks} "
                     f"blocks (setting × noise ratio)\nFriedman p = {test.friedman_p:.2g}; a bar joins methods the Nemenyi "
                     f"test does not separate (α = {stats.ALPHA:g});\nCD: critical difference of average ranks",
                     fontsize=9)
        paths = [stem.parent / f"{stem.name}.png", stem.parent / f"{stem.name}.svg"]
        fig.savefig(paths[0], dpi=150, metadata={"Software": None}, bbox_inches="tight")  # labels lie outside the axes
        fig.savefig(paths[1], metadata={"Date": None}, bbox_inches="tight")
        plt.close(fig)
    return paths


def _figure(table: Table, ylabel: str, title: str, stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.rc_context({"svg.hashsalt": "ncbench", "font.size": 9}):
        fig, ax = plt.subplots(figsize=(7.6, 4.2), layout="constrained")
        lines = [(clean, label) for clean in (False, True) for label in table.rows(clean)]
        for i, (clean, label) in enumerate(lines):
            cells = [(r, table.cell(clean, label, r)) for r in table.noise]
            x = [100 * r for r, c in cells if c]
            mean = [c[0] for _, c in cells if c]
            std = [c[1] if c[2] > 1 else 0.0 for _, c in cells if c]
            style = line_style(i)
            ax.plot(x, mean, **style, label=label + (" [clean data]" if clean else ""))
            ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=style["color"], alpha=0.15, linewidth=0)
        ax.set_xlabel("noise ratio (%)")
        ax.set_ylabel(ylabel)
        ax.set_xticks([100 * r for r in table.noise])
        dataset, noise, model, epochs, selection, _ = table.setting_parts()
        ax.set_title(f"{title}\n{dataset} · {noise} · {epochs} · {selection}\n{model}", fontsize=9)
        ax.grid(True, color="0.85", linewidth=0.6)
        ax.legend(fontsize=8, title=f"band: ± std over seeds\n(ddof=1), n ≤ {table.seeds}", title_fontsize=8,
                  loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: no line hidden behind it
        paths = [stem.parent / f"{stem.name}.png", stem.parent / f"{stem.name}.svg"]
        fig.savefig(paths[0], dpi=150, metadata={"Software": None})
        fig.savefig(paths[1], metadata={"Date": None})
        plt.close(fig)
    return paths

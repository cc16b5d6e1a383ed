"""Metric names referenced by PromQL expressions (promtool is not available here, so we parse ourselves).

Only what a metric-name check needs: strip string literals, label matchers, grouping clauses and
ranges, then keep the identifiers that are neither functions, aggregations, keywords, nor Grafana
variables. ``{__name__="x"}`` selectors and Grafana's ``label_values(metric, label)`` /
``metrics(...)`` variable queries are understood too.
"""

from __future__ import annotations

import re

FUNCTIONS = frozenset((
    "abs", "absent", "absent_over_time", "acos", "acosh", "asin", "asinh", "atan", "atanh", "avg_over_time", "ceil",
    "changes", "clamp", "clamp_max", "clamp_min", "cos", "cosh", "count_over_time", "day_of_month", "day_of_week",
    "day_of_year", "days_in_month", "deg", "delta", "deriv", "exp", "floor", "histogram_avg", "histogram_count",
    "histogram_fraction", "histogram_quantile", "histogram_stddev", "histogram_stdvar", "histogram_sum",
    "holt_winters", "double_exponential_smoothing", "hour", "idelta", "increase", "info", "irate", "label_join",
    "label_replace", "last_over_time", "ln", "log10", "log2", "mad_over_time", "max_over_time", "min_over_time",
    "minute", "month", "pi", "predict_linear", "present_over_time", "quantile_over_time", "rad", "rate", "resets",
    "round", "scalar", "sgn", "sin", "sinh", "sort", "sort_desc", "sort_by_label", "sort_by_label_desc", "sqrt",
    "stddev_over_time", "stdvar_over_time", "sum_over_time", "tan", "tanh", "time", "timestamp", "vector", "year",
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk", "quantile",
    "limitk", "limit_ratio",
))
KEYWORDS = frozenset((
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset", "atan2",
    "inf", "nan",
))
_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_NAME_MATCHER = re.compile(r'__name__\s*=\s*("(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\')')
# __name__=~"a|b": a regex that is only literal names joined by | (what dashboards write) names them.
_NAME_ALTERNATIVES = re.compile(r'__name__\s*=~\s*"([\w:|]+)"')
# name{matchers}, name, or {matchers}; a following "(" makes the name a function.
_SELECTOR = re.compile(r'(?<![\w:.$"])([A-Za-z_:][\w:]*)?\s*(\{(?:[^{}"]|"(?:\\.|[^"\\])*")*\})?(\s*\()?')
_LABELS = re.compile(r'([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"((?:\\.|[^"\\])*)"')
_BRACES = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")
_IDENT = re.compile(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(\s*\()?")
_GRAFANA_QUERY = re.compile(r"^\s*(?:label_values|metrics|query_result)\s*\((.*)\)\s*$", re.S)


def metric_names(expr: str) -> set[str]:
    """Names of the metrics (and recording rules) an expression selects."""
    grafana = _GRAFANA_QUERY.match(expr)
    if grafana:  # label_values(metric{...}, label) -> the metric; label_values(label) names none
        inner = grafana.group(1)
        if expr.lstrip().startswith("query_result"):
            return metric_names(inner)
        series = inner.rsplit(",", 1)[0] if "," in inner else ""
        return metric_names(series) if series.strip() else set()
    names = {m.group(1)[1:-1] for m in _NAME_MATCHER.finditer(expr)}
    names.update(n for m in _NAME_ALTERNATIVES.finditer(expr) for n in m.group(1).split("|"))
    text = re.sub(r"#[^\n]*", " ", _STRING.sub('""', expr))
    text = _VARIABLE.sub(" 0 ", text)
    previous = None
    while previous != text:  # nested braces/brackets/groupings (subqueries) go from the inside out
        previous = text
        text = _BRACES.sub(" ", text)
        text = _BRACKETS.sub(" ", text)
        text = _GROUPING.sub(" ", text)
    for m in _IDENT.finditer(text):
        word, call = m.group(1), m.group(2)
        if call or word in KEYWORDS or word in FUNCTIONS:
            continue
        names.add(word)
    return names


def selectors(expr: str) -> list[tuple[str, dict[str, tuple[str, str]]]]:
    """Each series selector of an expression: (metric name, {label: (operator, value)}).

    Label matchers of a selector without a name (``{__name__=~"a|b", ...}``) are given for each name.
    """
    out: list[tuple[str, dict[str, tuple[str, str]]]] = []
    grafana = _GRAFANA_QUERY.match(expr)
    if grafana:  # label_values(series, label): the series only
        expr = grafana.group(1).rsplit(",", 1)[0] if "," in grafana.group(1) else ""
    text = _GROUPING.sub(" ", re.sub(r"\[[^\[\]]*\]", " ", expr))
    for match in _SELECTOR.finditer(text):
        name, braces, call = match.group(1), match.group(2), match.group(3)
        if not name and not braces:
            continue
        if name and (call or name in KEYWORDS or name in FUNCTIONS):
            continue
        labels = {k: (op, v) for k, op, v in _LABELS.findall(braces or "")}
        names = [name] if name else sorted(metric_names(braces or ""))
        out += [(n, {k: v for k, v in labels.items() if k != "__name__"}) for n in names]
    return out

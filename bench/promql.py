"""A small PromQL evaluator: the subset the dashboard's panels use, over samples scraped here.

`bench/plots.py` scrapes the sidecar's `/metrics` once a second and renders the Grafana
dashboard's panels from the expressions in `config/observability/token-sidecar-dashboard.json`.
Without a Prometheus server, this module evaluates those expressions on the scraped samples, with
Prometheus's own semantics where they show in a plot: `rate()` extrapolates as Prometheus does
(counter resets, the 1.1 × sample-interval rule, never below zero), range selectors are left-open,
a series missing from a scrape is stale from then on, `histogram_quantile()` interpolates linearly
inside the bucket, `sum by (...)` over nothing is nothing (hence the dashboard's `or vector(0)`).

Supported: number literals; selectors with `=`, `!=`, `=~`, `!~` (regexes fully anchored) and an
optional `[range]`; `rate`, `increase`, `histogram_quantile`, `vector`; `sum`, `max`, `min`,
`avg`, `count` with `by (...)` before or after the argument; `* / + -` between scalars and
vectors (one-to-one matching); comparisons against a scalar as filters; `or`. Anything else is a
`PromQLError` naming what was not understood, so a new panel fails loudly instead of drawing
something wrong. Standard library only: `python3 -m unittest bench/test_promql.py` tests it.
"""

import bisect
import math
import re

LOOKBACK_S = 300.0  # Prometheus's default lookback for an instant selector
AGGREGATIONS = ("sum", "max", "min", "avg", "count")
FUNCTIONS = ("rate", "increase", "histogram_quantile", "vector")
COMPARISONS = ("==", "!=", ">", "<", ">=", "<=")
STALE = object()  # the marker stored when a series is missing from a scrape


class PromQLError(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# Samples


class Store:
    """Scraped samples: per series (labels with `__name__`, as a sorted tuple) its (t, value)s."""

    def __init__(self):
        self.series = {}  # labels -> ([t], [value or STALE])
        self.scrapes = []

    def add_scrape(self, t, samples):
        """One scrape at `t`: `samples` is a list of (name, {label: value}, value). A series that
        was present before and is missing now gets a staleness marker, as in Prometheus."""
        if self.scrapes and t <= self.scrapes[-1]:
            raise PromQLError("scrapes must be added in time order")
        self.scrapes.append(t)
        seen = set()
        for name, labels, value in samples:
            key = labels_key(name, labels)
            seen.add(key)
            times, values = self.series.setdefault(key, ([], []))
            times.append(t)
            values.append(float(value))
        for key, (times, values) in self.series.items():
            if key not in seen and values[-1] is not STALE:
                times.append(t)
                values.append(STALE)

    def instant(self, key, t):
        times, values = self.series[key]
        i = bisect.bisect_right(times, t) - 1
        if i < 0 or values[i] is STALE or times[i] <= t - LOOKBACK_S:
            return None
        return values[i]

    def window(self, key, start, end):
        """The samples with start < t <= end, staleness markers left out."""
        times, values = self.series[key]
        lo, hi = bisect.bisect_right(times, start), bisect.bisect_right(times, end)
        return [(times[i], values[i]) for i in range(lo, hi) if values[i] is not STALE]


def labels_key(name, labels):
    items = dict(labels)
    if name is not None:
        items["__name__"] = name
    return tuple(sorted(items.items()))


def without(labels, *names):
    return tuple((k, v) for k, v in labels if k not in names)


# ---------------------------------------------------------------------------------------------
# Parsing

TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
  | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<range>\[[^\]]*\])
  | (?P<op>==|!=|=~|!~|>=|<=|[-+*/(){}=,<>])
""", re.VERBOSE)
DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w|y)")
UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def tokenize(text):
    tokens, at = [], 0
    while at < len(text):
        m = TOKEN.match(text, at)
        if not m:
            raise PromQLError("cannot read %r at %d in %r" % (text[at:at + 10], at, text))
        if m.lastgroup != "space":
            tokens.append((m.lastgroup, m.group()))
        at = m.end()
    return tokens


def duration_s(text):
    body = text.strip()
    parts = DURATION.findall(body)
    if not parts or "".join(n + u for n, u in parts) != body:
        raise PromQLError("not a duration: %r" % text)
    return sum(float(n) * UNIT_S[u] for n, u in parts)


def unquote(text):
    body = text[1:-1]
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m.group(1), m.group(1)), body)


class Parser:
    """Recursive descent, lowest precedence first: or, comparisons, + -, * /, unary minus."""

    def __init__(self, text):
        self.text = text
        self.tokens = tokenize(text)
        self.at = 0

    def parse(self):
        node = self.or_expr()
        if self.at != len(self.tokens):
            self.fail("unexpected %r" % self.tokens[self.at][1])
        return node

    def fail(self, message):
        raise PromQLError("%s in %r" % (message, self.text))

    def peek(self, value=None):
        if self.at >= len(self.tokens):
            return None
        token = self.tokens[self.at]
        return token if value is None or token[1] == value else None

    def take(self, value=None, kind=None):
        token = self.peek()
        if token is None or (value is not None and token[1] != value) or \
                (kind is not None and token[0] != kind):
            self.fail("expected %s" % (value or kind))
        self.at += 1
        return token[1]

    def binary(self, operand, ops):
        node = operand()
        while self.peek() and self.peek()[1] in ops:
            op = self.take()
            if self.peek("bool") or self.peek("on") or self.peek("ignoring"):
                self.fail("%r modifiers are not supported" % self.peek()[1])
            node = ("binary", op, node, operand())
        return node

    def or_expr(self):
        node = self.comparison()
        while self.peek("or"):
            self.take()
            node = ("or", node, self.comparison())
        for word in ("and", "unless"):
            if self.peek(word):
                self.fail("%r is not supported" % word)
        return node

    def comparison(self):
        return self.binary(self.additive, COMPARISONS)

    def additive(self):
        return self.binary(self.multiplicative, ("+", "-"))

    def multiplicative(self):
        return self.binary(self.unary, ("*", "/"))

    def unary(self):
        if self.peek("-"):
            self.take()
            return ("binary", "*", ("number", -1.0), self.unary())
        return self.primary()

    def primary(self):
        token = self.peek()
        if token is None:
            self.fail("unexpected end")
        kind, value = token
        if kind == "number":
            self.take()
            return ("number", float(value))
        if value == "(":
            self.take()
            node = self.or_expr()
            self.take(")")
            return node
        if kind != "ident" and value != "{":
            self.fail("unexpected %r" % value)
        if value in AGGREGATIONS:
            return self.aggregation()
        if value in FUNCTIONS:
            return self.function()
        if self.at + 1 < len(self.tokens) and self.tokens[self.at + 1][1] == "(":
            self.fail("function %r is not supported" % value)
        return self.selector()

    def label_list(self):
        self.take("(")
        names = []
        while not self.peek(")"):
            names.append(self.take(kind="ident"))
            if not self.peek(")"):
                self.take(",")
        self.take(")")
        return tuple(names)

    def aggregation(self):
        op = self.take()
        by = None
        if self.peek("without"):
            self.fail("'without' is not supported")
        if self.peek("by"):
            self.take()
            by = self.label_list()
        self.take("(")
        arg = self.or_expr()
        self.take(")")
        if self.peek("by"):
            self.take()
            by = self.label_list()
        return ("aggregate", op, by or (), arg)

    def function(self):
        name = self.take()
        self.take("(")
        args = [self.or_expr()]
        while self.peek(","):
            self.take()
            args.append(self.or_expr())
        self.take(")")
        arity = {"rate": 1, "increase": 1, "histogram_quantile": 2, "vector": 1}[name]
        if len(args) != arity:
            self.fail("%s takes %d argument(s)" % (name, arity))
        return ("call", name, args)

    def selector(self):
        name = None
        if self.peek()[0] == "ident":
            name = self.take()
        matchers = []
        if self.peek("{"):
            self.take()
            while not self.peek("}"):
                label = self.take(kind="ident")
                op = self.take()
                if op not in ("=", "!=", "=~", "!~"):
                    self.fail("bad matcher %r" % op)
                matchers.append(matcher(label, op, unquote(self.take(kind="string"))))
                if not self.peek("}"):
                    self.take(",")
            self.take("}")
        if name is not None:
            matchers.append(matcher("__name__", "=", name))
        if not matchers:
            self.fail("empty selector")
        range_s = None
        if self.peek() and self.peek()[0] == "range":
            range_s = duration_s(self.take()[1:-1])
        return ("selector", tuple(matchers), range_s)


def matcher(label, op, value):
    if op in ("=~", "!~"):
        pattern = re.compile("(?:%s)" % value)
        test = lambda v: pattern.fullmatch(v) is not None  # noqa: E731
    else:
        test = lambda v: v == value  # noqa: E731
    negate = op in ("!=", "!~")
    return label, (lambda v: test(v) != negate)


def parse(text):
    return Parser(text).parse()


# ---------------------------------------------------------------------------------------------
# Evaluation: a scalar is a float, an instant vector a list of (labels, value), a range vector
# a list of (labels, [(t, value)]).


def evaluate(node, store, t):
    kind = node[0]
    if kind == "number":
        return node[1]
    if kind == "selector":
        return select(node, store, t)
    if kind == "call":
        return call(node, store, t)
    if kind == "aggregate":
        return aggregate(node[1], node[2], vector(evaluate(node[3], store, t), node[1]))
    if kind == "or":
        left = vector(evaluate(node[1], store, t), "or")
        right = vector(evaluate(node[2], store, t), "or")
        taken = {without(labels, "__name__") for labels, _ in left}
        return left + [(l, v) for l, v in right if without(l, "__name__") not in taken]
    if kind == "binary":
        return binary(node[1], evaluate(node[2], store, t), evaluate(node[3], store, t))
    raise PromQLError("cannot evaluate %r" % (kind,))


def vector(value, where):
    if not isinstance(value, list) or (value and isinstance(value[0][1], list)):
        raise PromQLError("%s needs an instant vector" % where)
    return value


def select(node, store, t):
    _, matchers, range_s = node
    out = []
    for key in store.series:
        labels = dict(key)
        if all(test(labels.get(label, "")) for label, test in matchers):
            if range_s is None:
                value = store.instant(key, t)
                if value is not None:
                    out.append((key, value))
            else:
                samples = store.window(key, t - range_s, t)
                if samples:
                    out.append((key, samples))
    # A range vector is marked by its range, which rate() needs.
    return out if range_s is None else RangeVector(out, range_s)


class RangeVector(list):
    def __init__(self, series, range_s):
        super().__init__(series)
        self.range_s = range_s


def call(node, store, t):
    _, name, args = node
    if name == "vector":
        value = evaluate(args[0], store, t)
        if not isinstance(value, float):
            raise PromQLError("vector() needs a scalar")
        return [((), value)]
    if name == "histogram_quantile":
        q = evaluate(args[0], store, t)
        if not isinstance(q, float):
            raise PromQLError("histogram_quantile() needs a scalar quantile")
        return histogram_quantile(q, vector(evaluate(args[1], store, t), name))
    matrix = evaluate(args[0], store, t)
    if not isinstance(matrix, RangeVector):
        raise PromQLError("%s() needs a range vector" % name)
    out = []
    for labels, samples in matrix:
        value = extrapolated_rate(samples, t - matrix.range_s, t, name == "rate")
        if value is not None:
            out.append((without(labels, "__name__"), value))
    return out


def extrapolated_rate(samples, start, end, per_second):
    """Prometheus's extrapolatedRate for counters (promql/functions.go)."""
    if len(samples) < 2:
        return None
    first_t, first_v = samples[0]
    last_t, last_v = samples[-1]
    result = last_v - first_v
    for (_, previous), (_, current) in zip(samples, samples[1:]):
        if current < previous:  # a counter reset
            result += previous
    to_start, to_end = first_t - start, end - last_t
    sampled = last_t - first_t
    average = sampled / (len(samples) - 1)
    if result > 0 and first_v >= 0:
        to_start = min(to_start, sampled * (first_v / result))
    threshold = average * 1.1
    interval = sampled
    interval += to_start if to_start < threshold else average / 2
    interval += to_end if to_end < threshold else average / 2
    result *= interval / sampled
    return result / (end - start) if per_second else result


def aggregate(op, by, elements):
    groups = {}
    for labels, value in elements:
        key = tuple((k, v) for k, v in labels if k in by and v != "")
        groups.setdefault(key, []).append(value)
    reduce = {"sum": math.fsum, "max": max, "min": min, "count": len,
              "avg": lambda vs: math.fsum(vs) / len(vs)}[op]
    return [(key, float(reduce(values))) for key, values in sorted(groups.items())]


def histogram_quantile(q, elements):
    groups = {}
    for labels, value in elements:
        le = dict(labels).get("le")
        if le is None:
            continue
        groups.setdefault(without(labels, "le", "__name__"), []).append((float(le), value))
    return [(labels, bucket_quantile(q, buckets)) for labels, buckets in sorted(groups.items())]


def bucket_quantile(q, buckets):
    """Prometheus's bucketQuantile (promql/quantile.go) for classic buckets."""
    if math.isnan(q):
        return math.nan
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    buckets = sorted(buckets)
    if len(buckets) < 2 or buckets[-1][0] != math.inf:
        return math.nan
    counts, most = [], 0.0
    for _, count in buckets:  # counts are cumulative: force them to be monotonic
        most = max(most, count)
        counts.append(most)
    total = counts[-1]
    if total == 0:
        return math.nan
    rank = q * total
    b = bisect.bisect_left(counts, rank)
    if b == len(buckets) - 1:
        return buckets[-2][0]
    if b == 0 and buckets[0][0] <= 0:
        return buckets[0][0]
    start, end, count = 0.0, buckets[b][0], counts[b]
    if b > 0:
        start = buckets[b - 1][0]
        count -= counts[b - 1]
        rank -= counts[b - 1]
    return start + (end - start) * (rank / count)


def arithmetic(op, a, b):
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if b == 0:
        return math.nan if a == 0 or math.isnan(a) else math.copysign(math.inf, a)
    return a / b


def compare(op, a, b):
    return {"==": a == b, "!=": a != b, ">": a > b, "<": a < b, ">=": a >= b,
            "<=": a <= b}[op]


def binary(op, left, right):
    for side in (left, right):
        if isinstance(side, RangeVector):
            raise PromQLError("%r needs instant vectors or scalars" % op)
    scalar_left, scalar_right = isinstance(left, float), isinstance(right, float)
    if scalar_left and scalar_right:
        if op in COMPARISONS:
            raise PromQLError("a comparison of two scalars needs 'bool'")
        return arithmetic(op, left, right)
    if scalar_left or scalar_right:
        elements, scalar = (right, left) if scalar_left else (left, right)
        if op in COMPARISONS:  # a filter: keeps the vector's elements for which it holds
            return [(l, v) for l, v in elements
                    if (compare(op, scalar, v) if scalar_left else compare(op, v, scalar))]
        return [(without(l, "__name__"),
                 arithmetic(op, scalar, v) if scalar_left else arithmetic(op, v, scalar))
                for l, v in elements]
    if op in COMPARISONS:
        raise PromQLError("comparisons between two vectors are not supported")
    matches = {}
    for labels, value in right:
        signature = without(labels, "__name__")
        if signature in matches:
            raise PromQLError("many-to-one matching is not supported (%r)" % (signature,))
        matches[signature] = value
    out = []
    for labels, value in left:
        signature = without(labels, "__name__")
        if signature in matches:
            out.append((signature, arithmetic(op, value, matches[signature])))
    return out


def evaluate_range(text, store, times):
    """`text` at each of `times`: {labels: [value or None per time]} (None where a series has no
    value, as a gap in Grafana)."""
    node = parse(text)
    out = {}
    for i, t in enumerate(times):
        result = evaluate(node, store, t)
        if isinstance(result, float):
            result = [((), result)]
        for labels, value in vector(result, "a panel"):
            out.setdefault(labels, [None] * len(times))[i] = value
    return out

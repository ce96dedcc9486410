"""PNG plots for scripts/bench: matplotlib when it can be imported, else a small pure-Python
PNG line-plot writer (standard library only: zlib and struct) so that a machine without
matplotlib still gets readable plots.

One kind of plot: categories along x (RAM sizes, dirty rates, device state sizes), one line
per series through the medians, with min-max error bars. A series value is None where the
row is missing or failed; the line then skips that category.
"""

import math
import struct
import zlib

PALETTE = {
    "minivmm": (31, 119, 180),
    "qemu": (255, 127, 14),
    "raw": (110, 110, 110),
    "other": (44, 160, 44),
    "green": (44, 160, 44),
    "blue": (31, 119, 180),
    "purple": (148, 103, 189),
    "red": (214, 39, 40),
    "brown": (140, 86, 75),
}
DASHED = {"raw"}


def _color(s):
    c = s.get("color") or s.get("kind")
    return c if isinstance(c, tuple) else PALETTE.get(c, PALETTE["other"])


def _dashed(s):
    return s.get("dashed", s.get("kind") in DASHED)


def have_matplotlib():
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def plot(path, *, title, xlabel, ylabel, categories, series, log_y=None):
    """Writes a PNG to `path`; returns the backend used ("matplotlib" or "builtin").

    `series`: [{"label": str, "kind": "minivmm"|"qemu"|"raw"|..., "values": [None or
    (median, min, max) per category]}], optionally "color" (a PALETTE name or RGB tuple; else
    by kind), "dashed" (bool; else dashed for "raw") and "marker" (matplotlib's; default o). `log_y`: None picks a log scale when the positive
    values span more than a factor of 50."""
    values = [v for s in series for t in s["values"] if t for v in t if v is not None and v > 0]
    if log_y is None:
        log_y = bool(values) and max(values) / min(values) > 50
    if have_matplotlib():
        _plot_matplotlib(path, title, xlabel, ylabel, categories, series, log_y)
        return "matplotlib"
    _plot_builtin(path, title, xlabel, ylabel, categories, series, log_y)
    return "builtin"


def _plot_matplotlib(path, title, xlabel, ylabel, categories, series, log_y):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    xs = list(range(len(categories)))
    for s in series:
        pts = [(x, v) for x, v in zip(xs, s["values"]) if v is not None and v[0] is not None]
        if not pts:
            continue
        color = tuple(c / 255 for c in _color(s))
        px = [x for x, _ in pts]
        med = [v[0] for _, v in pts]
        lo = [v[0] - v[1] for _, v in pts]
        hi = [v[2] - v[0] for _, v in pts]
        ax.errorbar(px, med, yerr=[lo, hi], label=s["label"], color=color,
                    capsize=4, linestyle="--" if _dashed(s) else "-",
                    marker=s.get("marker", "o"))
    ax.set_xticks(xs)
    ax.set_xticklabels(categories)
    ax.set_xlim(-0.5, len(categories) - 0.5)
    if log_y:
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Built-in writer: an RGB canvas, lines, markers, a 5x7 bitmap font, PNG encoding.

_FONT = {
    "0": (14, 17, 19, 21, 25, 17, 14), "1": (4, 12, 4, 4, 4, 4, 14),
    "2": (14, 17, 1, 2, 4, 8, 31), "3": (31, 2, 4, 2, 1, 17, 14),
    "4": (2, 6, 10, 18, 31, 2, 2), "5": (31, 16, 30, 1, 1, 17, 14),
    "6": (6, 8, 16, 30, 17, 17, 14), "7": (31, 1, 2, 4, 8, 8, 8),
    "8": (14, 17, 17, 14, 17, 17, 14), "9": (14, 17, 17, 15, 1, 2, 12),
    "A": (14, 17, 17, 17, 31, 17, 17), "B": (30, 17, 17, 30, 17, 17, 30),
    "C": (14, 17, 16, 16, 16, 17, 14), "D": (28, 18, 17, 17, 17, 18, 28),
    "E": (31, 16, 16, 30, 16, 16, 31), "F": (31, 16, 16, 30, 16, 16, 16),
    "G": (14, 17, 16, 23, 17, 17, 15), "H": (17, 17, 17, 31, 17, 17, 17),
    "I": (14, 4, 4, 4, 4, 4, 14), "J": (7, 2, 2, 2, 2, 18, 12),
    "K": (17, 18, 20, 24, 20, 18, 17), "L": (16, 16, 16, 16, 16, 16, 31),
    "M": (17, 27, 21, 21, 17, 17, 17), "N": (17, 17, 25, 21, 19, 17, 17),
    "O": (14, 17, 17, 17, 17, 17, 14), "P": (30, 17, 17, 30, 16, 16, 16),
    "Q": (14, 17, 17, 17, 21, 18, 13), "R": (30, 17, 17, 30, 20, 18, 17),
    "S": (15, 16, 16, 14, 1, 1, 30), "T": (31, 4, 4, 4, 4, 4, 4),
    "U": (17, 17, 17, 17, 17, 17, 14), "V": (17, 17, 17, 17, 17, 10, 4),
    "W": (17, 17, 17, 21, 21, 21, 10), "X": (17, 17, 10, 4, 10, 17, 17),
    "Y": (17, 17, 17, 10, 4, 4, 4), "Z": (31, 1, 2, 4, 8, 16, 31),
    " ": (0,) * 7, ".": (0, 0, 0, 0, 0, 12, 12), ",": (0, 0, 0, 0, 12, 4, 8),
    "-": (0, 0, 0, 31, 0, 0, 0), "_": (0, 0, 0, 0, 0, 0, 31),
    ":": (0, 12, 12, 0, 12, 12, 0), "/": (0, 1, 2, 4, 8, 16, 0),
    "(": (2, 4, 8, 8, 8, 4, 2), ")": (8, 4, 2, 2, 2, 4, 8),
    "%": (24, 25, 2, 4, 8, 19, 3), "=": (0, 0, 31, 0, 31, 0, 0),
    "+": (0, 4, 4, 31, 4, 4, 0), "<": (2, 4, 8, 16, 8, 4, 2),
    ">": (8, 4, 2, 1, 2, 4, 8), "?": (14, 17, 1, 2, 4, 0, 4),
}
_SUBST = {"×": "X", "–": "-", "—": "-", "≤": "<", "≥": ">", "µ": "U"}


class _Canvas:
    def __init__(self, w, h):
        self.w, self.h = w, h
        self.px = bytearray(b"\xff" * (w * h * 3))

    def set(self, x, y, rgb):
        if 0 <= x < self.w and 0 <= y < self.h:
            i = (y * self.w + x) * 3
            self.px[i:i + 3] = bytes(rgb)

    def rect(self, x0, y0, x1, y1, rgb):
        for y in range(max(0, y0), min(self.h, y1 + 1)):
            for x in range(max(0, x0), min(self.w, x1 + 1)):
                self.set(x, y, rgb)

    def line(self, x0, y0, x1, y1, rgb, width=1, dash=0):
        x0, y0, x1, y1 = int(round(x0)), int(round(y0)), int(round(x1)), int(round(y1))
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err, n = dx + dy, 0
        while True:
            if not dash or (n // dash) % 2 == 0:
                for ox in range(-(width // 2), width - width // 2):
                    for oy in range(-(width // 2), width - width // 2):
                        self.set(x0 + ox, y0 + oy, rgb)
            n += 1
            if x0 == x1 and y0 == y1:
                break
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def text(self, x, y, s, rgb=(0, 0, 0), scale=1, anchor="left", vertical=False):
        s = "".join(_SUBST.get(c, c) for c in s).upper()
        width = len(s) * 6 * scale
        if anchor == "center":
            offset = -width // 2
        elif anchor == "right":
            offset = -width
        else:
            offset = 0
        for i, c in enumerate(s):
            glyph = _FONT.get(c, _FONT["?"])
            for row, bits in enumerate(glyph):
                for col in range(5):
                    if bits & (16 >> col):
                        for a in range(scale):
                            for b in range(scale):
                                along = offset + (i * 6 + col) * scale + a
                                across = row * scale + b
                                if vertical:
                                    self.set(x + across, y - along, rgb)
                                else:
                                    self.set(x + along, y + across, rgb)

    def png(self):
        raw = b"".join(b"\x00" + bytes(self.px[y * self.w * 3:(y + 1) * self.w * 3])
                       for y in range(self.h))

        def chunk(kind, data):
            return (struct.pack(">I", len(data)) + kind + data
                    + struct.pack(">I", zlib.crc32(kind + data) & 0xffffffff))

        return (b"\x89PNG\r\n\x1a\n"
                + chunk(b"IHDR", struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def _nice_ticks(lo, hi, n=5):
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    # Up to the first tick at or above `hi`, so that every value lies inside the axis.
    ticks = [round(first, 10)]
    while ticks[-1] < hi - step * 1e-9:
        ticks.append(round(ticks[-1] + step, 10))
    return ticks


def _fmt_tick(v):
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:.0f}"
    if abs(v) >= 1:
        return f"{v:g}"
    return f"{v:.2g}"


def _plot_builtin(path, title, xlabel, ylabel, categories, series, log_y):
    w, h = 900, 540
    left, right, top, bottom = 90, 230, 50, 70
    c = _Canvas(w, h)
    pw, ph = w - left - right, h - top - bottom
    vals = [v for s in series for t in s["values"] if t for v in t if v is not None]
    pos = [v for v in vals if v > 0]
    if log_y and pos:
        lo = 10 ** math.floor(math.log10(min(pos)))
        hi = 10 ** math.ceil(math.log10(max(pos)))
        if hi <= lo:
            hi = lo * 10
        ticks = []
        t = lo
        while t <= hi * 1.0001:
            ticks.append(t)
            t *= 10

        def ty(v):
            v = max(v, lo)
            return top + ph - (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * ph
    else:
        hi = max(vals) * 1.1 if vals and max(vals) > 0 else 1.0
        ticks = _nice_ticks(0, hi)
        hi = ticks[-1]

        def ty(v):
            return top + ph - v / hi * ph

    n = max(1, len(categories))

    def tx(i):
        return left + (i + 0.5) * pw / n

    grid, axis = (225, 225, 225), (0, 0, 0)
    for t in ticks:
        y = int(round(ty(t)))
        c.line(left, y, left + pw, y, grid)
        c.text(left - 6, y - 3, _fmt_tick(t), anchor="right")
    c.line(left, top, left, top + ph, axis)
    c.line(left, top + ph, left + pw, top + ph, axis)
    for i, cat in enumerate(categories):
        x = int(round(tx(i)))
        c.line(x, top + ph, x, top + ph + 4, axis)
        c.text(x, top + ph + 10, str(cat), anchor="center")
    c.text(left + pw // 2, 14, title, scale=2, anchor="center")
    c.text(left + pw // 2, h - 24, xlabel, anchor="center")
    c.text(16, top + ph // 2, ylabel, anchor="center", vertical=True)

    for k, s in enumerate(series):
        rgb = _color(s)
        dash = 6 if _dashed(s) else 0
        prev = None
        for i, v in enumerate(s["values"]):
            if v is None or v[0] is None:
                prev = None
                continue
            x, y = tx(i), ty(v[0])
            if prev:
                c.line(prev[0], prev[1], x, y, rgb, width=2, dash=dash)
            prev = (x, y)
            if v[1] is not None and v[2] is not None:
                c.line(x, ty(v[1]), x, ty(v[2]), rgb)
                c.line(x - 4, ty(v[1]), x + 4, ty(v[1]), rgb)
                c.line(x - 4, ty(v[2]), x + 4, ty(v[2]), rgb)
            if s.get("marker", "o") == "s":
                c.rect(int(x) - 3, int(y) - 3, int(x) + 3, int(y) + 3, rgb)
            else:
                for oy in range(-4, 5):
                    for ox in range(-4, 5):
                        if ox * ox + oy * oy <= 16:
                            c.set(int(x) + ox, int(y) + oy, rgb)
        ly = top + 10 + k * 18
        c.line(left + pw + 15, ly + 3, left + pw + 40, ly + 3, rgb, width=2, dash=dash)
        c.text(left + pw + 46, ly, s["label"][:28])

    with open(path, "wb") as f:
        f.write(c.png())

"""Grading of math answers for `evaluate.py --task math`: the last \\boxed{...} of a reply,
compared with the reference as numbers where both parse as one, else as normalised strings.

Outside the engine: nothing here knows about models or caches.
"""

import math
import re

UNITS = re.compile(r"\s+(?:[a-zA-Z]+\.?\s*)+$")  # trailing words: "18 dollars", "5 cm."


def last_boxed(text: str) -> str | None:
    """Contents of the last complete \\boxed{...} in `text` (nested braces allowed), or None."""
    for start in reversed([m.end() for m in re.finditer(r"\\boxed\s*\{", text)]):
        depth = 1
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i]
    return None


def reference(value) -> str:
    """A dataset's answer field as a bare answer: GSM8K's text after '####', a worked
    solution's last \\boxed{...}, else the value itself (AMC/AIME answers may be numbers)."""
    text = str(value)
    if "####" in text:
        return text.split("####")[-1].strip()
    return last_boxed(text) or text.strip()


def normalise(answer: str) -> str:
    """Spacing, sizing and text wrappers removed, lower case: for non-numeric answers."""
    s = re.sub(r"\\(?:text|mbox|mathrm|textbf)\s*\{([^{}]*)\}", r"\1", answer)
    s = re.sub(r"\\left|\\right|\\[!,;: ]|\s", "", s).replace("\\dfrac", "\\frac")
    return s.replace("\\tfrac", "\\frac").rstrip(".").lower()


def to_number(answer: str) -> float | None:
    """The value of a numeric answer, or None: '$1,000', '18 dollars', '50\\%', '\\frac{1}{2}',
    '\\dfrac12', '-3/4', '0.5', 'x = 5'."""
    s = re.sub(r"\\(?:text|mbox|mathrm)\s*\{([^{}]*)\}", r" \1", answer)
    s = re.sub(r"\\left|\\right|\\[!,;: ]|\\?\$|\\?%|\^\{?\\circ\}?", "", s).strip()
    s = s.split("=")[-1].strip().rstrip(".")
    s = UNITS.sub("", s).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s).replace(" ", "")
    number = r"-?(?:\d+\.?\d*|\.\d+)"
    if m := re.fullmatch(rf"(-?)\\frac(?:\{{({number})\}}|(\d))(?:\{{({number})\}}|(\d))", s):
        sign, num, den = m[1], m[2] or m[3], m[4] or m[5]
    elif m := re.fullmatch(rf"()({number})/({number})", s):
        sign, num, den = m[1], m[2], m[3]
    elif re.fullmatch(number, s):
        return float(s)
    else:
        return None
    if float(den) == 0:
        return None
    return (-1 if sign else 1) * float(num) / float(den)


def is_correct(reply: str, ref: str) -> bool:
    """Whether the last \\boxed{} of `reply` equals the reference answer `ref`."""
    answer = last_boxed(reply)
    if answer is None or not answer.strip():
        return False
    a, b = to_number(answer), to_number(ref)
    if a is not None and b is not None:
        if a.is_integer() and b.is_integer():  # 1e-6 of 1,450,000 would let 1,450,001 pass
            return a == b
        return math.isclose(a, b, rel_tol=1e-6)
    return normalise(answer) == normalise(ref)

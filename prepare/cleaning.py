"""Text normalisation, quality rules and PII scrubbing for `python -m prepare`: pure functions of
one document, so the Beam pipeline can run them anywhere."""

import collections
import dataclasses
import html
import ipaddress
import re
import string
import unicodedata

# Control characters (Unicode category Cc) other than \n and \t; \r is handled first.
_CONTROL = re.compile(r'[\x00-\x08\x0b-\x1f\x7f-\x9f]')
_TAG = re.compile(r'</?[A-Za-z][A-Za-z0-9-]*(?:\s[^<>]*)?/?>|<!--.*?-->', re.DOTALL)
_SPACES = re.compile(r'(?<=\S)[ \t]+')  # inside a line: indentation is kept
_TRAILING = re.compile(r'[ \t]+\n')
_BLANK_LINES = re.compile(r'\n{3,}')
_EMAIL = re.compile(r'\b[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b')
_IPV4 = re.compile(r'\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b')
# IPv6 candidates: hex groups joined by at least two colons; `ipaddress` decides which are real.
_IPV6 = re.compile(r'(?<![\w:.])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:])')
PII_PLACEHOLDERS = {'email': '<EMAIL>', 'ip': '<IP_ADDRESS>'}


def normalise(text: str) -> str:
  """NFC, \\n line ends, no control characters or HTML remnants, spaces and blank lines collapsed.

  Runs of spaces and tabs become one space after a line's first word; the leading ones stay,
  since indentation is syntax in Python and structure in prose lists."""
  text = unicodedata.normalize('NFC', text.replace('\r\n', '\n').replace('\r', '\n'))
  text = html.unescape(_TAG.sub('', _CONTROL.sub('', text)))
  text = _CONTROL.sub('', text)  # an entity such as &#1; may have unescaped to one
  text = _TRAILING.sub('\n', _SPACES.sub(' ', text))
  return _BLANK_LINES.sub('\n\n', text).strip()


def scrub_pii(text: str) -> tuple[str, dict[str, int]]:
  """E-mail and IP addresses replaced by placeholders, and how many of each were replaced."""
  text, emails = _EMAIL.subn(PII_PLACEHOLDERS['email'], text)
  text, ipv4s = _IPV4.subn(PII_PLACEHOLDERS['ip'], text)
  ipv6s = 0

  def ipv6(match):
    nonlocal ipv6s
    if len(match[0]) < 6:  # `a::b` is a valid address but far more often code
      return match[0]
    try:
      ipaddress.IPv6Address(match[0])
    except ValueError:
      return match[0]
    ipv6s += 1
    return PII_PLACEHOLDERS['ip']

  text = _IPV6.sub(ipv6, text)
  return text, {'email': emails, 'ip': ipv4s + ipv6s}


def flag_field(default, help_text):
  """A dataclass field that is also a command-line flag, with its help text."""
  return dataclasses.field(default=default, metadata={'help': help_text})


@dataclasses.dataclass(frozen=True)
class Rules:
  """Quality thresholds. The defaults keep ordinary prose and source code; flags tighten them."""
  min_chars: int = flag_field(20, 'fewest characters a document may have')
  max_chars: int = flag_field(1_000_000, 'most characters a document may have')
  min_alpha_ratio: float = flag_field(0.25, 'least share of alphabetic characters')
  max_symbol_ratio: float = flag_field(
      0.4, 'most share of characters neither alphanumeric nor space')
  max_digit_ratio: float = flag_field(0.4, 'most share of digits')
  max_dup_line_ratio: float = flag_field(0.5, 'most share of line characters in repeated lines')
  max_dup_ngram_ratio: float = flag_field(0.6, 'most share of word characters in repeated n-grams')
  dup_ngram_words: int = flag_field(10, 'words per n-gram of max_dup_ngram_ratio')


# The rules, by the names `failed_rule` gives (each a threshold field of `Rules`).
RULE_NAMES = tuple(f.name for f in dataclasses.fields(Rules) if f.name != 'dup_ngram_words')


_ASCII_ALPHA = (string.ascii_letters).encode()
_ASCII_SPACE = ''.join(c for c in map(chr, range(128)) if c.isspace()).encode()


def _ratios(text: str) -> tuple[float, float, float]:
  """Shares of alphabetic, digit and symbol (neither alphanumeric nor space) characters."""
  n = len(text)
  if text.isascii():  # the same counts, by bytes.translate in C: most text is ASCII
    data = text.encode('ascii')
    alpha, digit, space = (n - len(data.translate(None, chars))
                           for chars in (_ASCII_ALPHA, string.digits.encode(), _ASCII_SPACE))
  else:
    alpha = sum(map(str.isalpha, text))
    digit = sum(map(str.isdigit, text))
    space = sum(map(str.isspace, text))
  return alpha / n, digit / n, (n - alpha - digit - space) / n


def dup_line_ratio(text: str) -> float:
  """Share of the characters of non-blank lines that sit in repeats of an earlier line."""
  lines = [line.strip() for line in text.split('\n') if line.strip()]
  total = sum(map(len, lines))
  seen, repeated = set(), 0
  for line in lines:
    if line in seen:
      repeated += len(line)
    seen.add(line)
  return repeated / total if total else 0.0


def dup_ngram_ratio(text: str, n: int) -> float:
  """Share of word characters covered by word n-grams that occur more than once."""
  words = text.split()
  if len(words) < n:
    return 0.0
  grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
  counts = collections.Counter(grams)
  covered = bytearray(len(words))
  for i, gram in enumerate(grams):
    if counts[gram] > 1:
      covered[i:i + n] = b'\1' * n
  total = sum(map(len, words))
  return sum(len(w) for w, c in zip(words, covered) if c) / total


def failed_rule(text: str, rules: Rules) -> str | None:
  """The name of the first rule `text` breaks (cheapest checks first), or None if it passes."""
  if len(text) < rules.min_chars:
    return 'min_chars'
  if len(text) > rules.max_chars:
    return 'max_chars'
  alpha, digit, symbol = _ratios(text)
  if alpha < rules.min_alpha_ratio:
    return 'min_alpha_ratio'
  if symbol > rules.max_symbol_ratio:
    return 'max_symbol_ratio'
  if digit > rules.max_digit_ratio:
    return 'max_digit_ratio'
  if dup_line_ratio(text) > rules.max_dup_line_ratio:
    return 'max_dup_line_ratio'
  if dup_ngram_ratio(text, rules.dup_ngram_words) > rules.max_dup_ngram_ratio:
    return 'max_dup_ngram_ratio'
  return None

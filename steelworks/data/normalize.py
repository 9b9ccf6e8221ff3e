"""Text normalizers: pure ``text -> text`` functions, named in recipes (``NORMALIZERS``).

Each one is cheap on text it does not change (a quick check before the regex pass where
one exists), because every document of a corpus goes through every normalizer of its
recipe. They mirror data-juicer's mappers used by Steel-LLM (``chinese_convert_mapper``,
``clean_email_mapper``, ``clean_ip_mapper``, ``clean_links_mapper``,
``whitespace_normalization_mapper``), rewritten as regexes that behave on Chinese text,
where words are not separated by spaces (a URL pattern of ``\\S+`` would swallow the
Chinese sentence that follows the link).
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections.abc import Callable
from functools import lru_cache
from typing import Any

# --- control characters -----------------------------------------------------------------
# \r is a line break, not noise: \r\n and a lone \r (old Mac files) become \n first, so
# deleting the remaining controls can never glue two lines together.
_CR = re.compile(r"\r\n?")
# C0 controls except \t (0x09) and \n (0x0a), DEL, and the C1 block (0x80-0x9f).
_CTRL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


# Characters that NFKC leaves alone and that never combine with a neighbour (UAX #15
# "stable" code points): ASCII, the main Han block and common CJK punctuation. Normalizing
# only the runs of other characters, each with the character before it (a base letter
# takes the combining marks that follow it), gives the same result as normalizing the whole
# text, at twice the speed on Chinese prose, which is mostly stable characters.
_UNSTABLE_RUN = re.compile(
    r".?[^\x00-\x7f\u4e00-\u9fff\u3001\u3002\u300a-\u3011\u2018\u2019\u201c\u201d]+", re.S)


def _nfkc_run(m: re.Match[str]) -> str:
    return unicodedata.normalize("NFKC", m.group())


def nfkc(text: str) -> str:
    """Unicode NFKC: full-width forms -> ASCII (this includes the Chinese punctuation
    ``，：；！？（）`` -> ``,:;!?()``), ligatures and compatibility spaces (``\\u3000``, nbsp)
    -> plain forms. ``。、《》【】「」`` have no compatibility mapping and stay."""
    if unicodedata.is_normalized("NFKC", text):
        return text
    return _UNSTABLE_RUN.sub(_nfkc_run, text)


def remove_control_chars(text: str) -> str:
    """Drop C0/C1 control characters except ``\\n`` and ``\\t`` (``\\r\\n``/``\\r`` -> ``\\n``)."""
    if "\r" in text:
        text = _CR.sub("\n", text)
    return _CTRL.sub("", text)


# --- whitespace ---------------------------------------------------------------------------
# Line breaks other than \n that str.splitlines() honours; they become \n.
_BREAKS = re.compile(r"\r\n?|[\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")
# Any whitespace except \n (tabs, \u3000, nbsp, thin spaces ...), as one run.
_HSPACE = re.compile(r"[^\S\n]+")
_LINE_EDGES = re.compile(r" ?\n ?")  # after collapsing, a line edge has at most one space
_BLANKS: dict[int, re.Pattern[str]] = {}


def clean_whitespace(text: str, max_blank_lines: int = 1) -> str:
    """Unify whitespace for prose (never for code: it collapses indentation).

    Every unicode space (tab, ``\\u3000``, nbsp, ...) becomes ``" "`` and runs collapse to one;
    each line is stripped; runs of empty lines keep at most ``max_blank_lines`` (1 keeps
    paragraph breaks; 0 drops every empty line, as the original ``clean.normalize`` did);
    all line breaks become ``\\n``; the text is stripped. Whole-text regexes rather than a
    per-line Python loop: this runs on every document.
    """
    text = _BREAKS.sub("\n", text)
    text = _HSPACE.sub(" ", text)
    text = _LINE_EDGES.sub("\n", text)
    pat = _BLANKS.get(max_blank_lines)
    if pat is None:
        pat = _BLANKS[max_blank_lines] = re.compile(f"\n{{{max_blank_lines + 2},}}")
    text = pat.sub("\n" * (max_blank_lines + 1), text)
    return text.strip()


# data-juicer's whitespace_normalization_mapper set: exotic spaces mapped to " " one by one.
_EXOTIC_SPACES = re.compile("[\u00a0\u1680\u2000-\u200b\u202f\u205f\u3000\ufeff]")


def unify_spaces(text: str) -> str:
    """Exotic unicode spaces (nbsp, ``\\u3000``, zero-width, BOM ...) -> ``" "``, one for one.
    Unlike ``clean_whitespace`` nothing collapses, so it is safe for code indentation."""
    return _EXOTIC_SPACES.sub(" ", text)


# --- Traditional -> Simplified Chinese ----------------------------------------------------
@lru_cache(maxsize=4)
def _opencc(config: str) -> Any:
    """One converter per process and config: building it loads dictionaries (~10 ms)."""
    import opencc

    return opencc.OpenCC(config)


def traditional_to_simplified(text: str, config: str = "t2s") -> str:
    """OpenCC conversion (default ``t2s``, as Steel-LLM's ``chinese_convert_mapper``)."""
    return _opencc(config).convert(text)


# --- personal information and links -------------------------------------------------------
_EMAIL = re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")


def remove_emails(text: str, repl: str = "") -> str:
    """Replace e-mail addresses by ``repl``. ASCII only: a Chinese character directly before
    or after an address is never taken as part of it."""
    if "@" not in text:
        return text
    return _EMAIL.sub(repl, text)


_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
# Not inside a longer dotted number (version strings like 1.2.3.4.5); a sentence-final
# period after the address is allowed.
_IPV4 = re.compile(rf"(?<![\d.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\.?\d)")
# IPv6 candidates: a run of hex digits, colons and dots with at least two colons; each is
# validated with the ipaddress module, so clock times ("12:30:45") and "a::b" in prose stay.
# Possessive quantifiers keep the scan linear on long runs of colons.
_IPV6_CAND = re.compile(r"(?<![0-9A-Za-z_.])[0-9A-Fa-f.]*+:[0-9A-Fa-f:.]*+(?![0-9A-Za-z_])")


def _is_ipv6(s: str) -> bool:
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return False
    return True


def remove_ips(text: str, repl: str = "") -> str:
    """Replace IPv4 and IPv6 addresses by ``repl``."""
    if ":" in text:

        def _sub6(m: re.Match[str]) -> str:
            s = m.group(0)
            if s.count(":") < 2:
                return s
            # Trailing sentence punctuation and a label colon before the address
            # ("地址:fe80::1") are not part of it.
            core = s.rstrip(".")
            lead = ""
            if not _is_ipv6(core) and core.startswith(":") and not core.startswith("::"):
                lead, core = ":", core[1:]
            if _is_ipv6(core):
                return lead + repl + s[len(lead) + len(core):]
            return s

        text = _IPV6_CAND.sub(_sub6, text)
    if "." in text:
        text = _IPV4.sub(repl, text)
    return text


# URL characters are ASCII only (RFC 3986; non-ASCII is percent-encoded on the wire), and a
# link never ends in sentence punctuation, so "见https://a.cn/x。详情" removes only the URL.
_URL_BODY = r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]*[A-Za-z0-9\-_~/#=&%+]"
_LINK = re.compile(rf"(?:(?:https?|ftp)://|(?<![A-Za-z0-9.])www\.){_URL_BODY}", re.IGNORECASE)


def remove_links(text: str, repl: str = "") -> str:
    """Replace http(s)/ftp URLs and bare ``www.`` links by ``repl``."""
    if "://" not in text and "www." not in text and "WWW." not in text:
        return text
    return _LINK.sub(repl, text)


NORMALIZERS: dict[str, Callable[..., str]] = {
    "nfkc": nfkc,
    "remove_control_chars": remove_control_chars,
    "clean_whitespace": clean_whitespace,
    "unify_spaces": unify_spaces,
    "traditional_to_simplified": traditional_to_simplified,
    "remove_emails": remove_emails,
    "remove_ips": remove_ips,
    "remove_links": remove_links,
}

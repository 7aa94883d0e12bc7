"""Validation errors as sentences a user can act on: the field's path, then what is wrong.

One wording for every object we validate: our CRDs (as status conditions) and the Kubernetes
objects a manifest file holds (as the file's error). A user never reads pydantic's own
vocabulary (`constrained-str`, `function-after[...]`, `Value error,`, `instance of X`, a regex):
`explain` rewrites it (`_WORDING`: "must be at most 65535 (it is 70000)", not "Input should be less
than or equal to 65535"), patterns are named for what they stand for (`_PATTERN_WORDS`), and the
checks pydantic has no words for (an IP literal, a port) are here too, each raising a
`PydanticCustomError` with its sentence.

The checks follow Envoy's own rules, measured against the real Envoy in
tests/test_envoy_refuses.py: what we accept, Envoy loads; what Envoy would refuse (NACK), we refuse
first, on the object a user can fix.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import ValidationError
from pydantic_core import PydanticCustomError

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_NAME = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
HEADER_NAME = r"^:?[A-Za-z0-9!#$%&'*+.^_`|~-]+$"
"""An HTTP header name: a token (RFC 9110), or a pseudo-header such as :authority. Envoy's own
strict rule (protoc-gen-validate's HTTP_HEADER_NAME); its proto only refuses NUL, CR and LF in a
matcher's name, but a name outside this rule can never match a request Envoy's codecs admit."""
HEADER_VALUE = r"^[^\x00-\x08\x0a-\x1f\x7f]*$"
"""A header matcher's value: no control characters but tab (Envoy's strict HTTP_HEADER_VALUE rule).
Envoy's proto accepts any, but its codecs refuse a request that carries one (400), so a matcher
with one could never match."""
PATH = r"^/[\x21\x22\x24-\x3e\x40-\x7e]*$"
"""A path or path prefix a route matches: '/', then printable ASCII but '?' and '#'. Envoy's proto
accepts any string, but it matches the request's path with the query string and fragment removed,
and its codecs refuse a request whose path has spaces, control characters or raw non-ASCII bytes
(400): a route with one could never match."""

_PATTERN_WORDS = {
    DNS_LABEL: "a DNS label (lowercase letters, digits and '-', starting and ending with a letter or digit, "
               "such as api)",
    DNS_NAME: "a DNS name (lowercase letters, digits, '-' and '.', such as api.shop.svc.cluster.local)",
    HEADER_NAME: "an HTTP header name (letters, digits and !#$%&'*+.^_`|~-, such as x-tenant, or a "
                 "pseudo-header such as :authority)",
    HEADER_VALUE: "a header value: control characters (but tab) cannot be in a request Envoy accepts, so the "
                  "route could never match",
    PATH: "a path: '/' then printable ASCII, with no spaces, '?' or '#' (Envoy matches the path without its "
          "query string, and refuses requests with spaces, control or non-ASCII characters in the path; write "
          "those percent-encoded, such as %20)",
}


def explain(error: ValidationError, prefix: str) -> list[str]:
    """One sentence per problem, each naming the field under `prefix` (such as "spec")."""
    sentences: list[str] = []
    for problem in error.errors():
        sentence = _sentence(problem, prefix)
        if sentence not in sentences:  # the members of a union can say the same thing twice
            sentences.append(sentence)
    return sentences


_MEMBERS = {"int", "str", "float", "bool", "none", "list", "dict", "bytes"}


def _is_field(part: str | int) -> bool:
    """False for the parts of an error's location that pydantic adds for itself: a union's member
    (`int`, `constrained-str`), a wrapped validator (`function-after[...]`), a literal's value."""
    return isinstance(part, int) or not ("[" in part or part.startswith("constrained-") or part in _MEMBERS)


def _sentence(problem: Mapping[str, Any], prefix: str) -> str:
    *path, last = problem["loc"] or ("",)
    parts = [p for p in path if _is_field(p)]
    if problem["type"] == "extra_forbidden" or (_is_field(last) and last != ""):  # an unknown field as written
        parts.append(last)
    where = prefix + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)
    context = problem.get("ctx") or {}
    where = (where + context.get("at", "")).lstrip(".") or "(the object)"
    return f"{where}: {_what(problem, context)}"


def _what(problem: Mapping[str, Any], context: Mapping[str, Any]) -> str:
    kind, message, value = problem["type"], problem["msg"], problem.get("input")
    if kind == "extra_forbidden":
        return "unknown field; check its spelling against the CRD (kubectl explain)"
    if kind == "string_pattern_mismatch" and context.get("pattern") in _PATTERN_WORDS:
        return f"{shown(value)} is not {_PATTERN_WORDS[context['pattern']]}"
    if kind == "string_unicode":
        return (f"{shown(value)} is not valid Unicode text (it has a lone surrogate, such as \\ud800, which "
                "protobuf cannot carry to Envoy)")
    if kind == "value_error":
        return message.removeprefix("Value error, ")
    if kind == "missing":
        return "required, but missing: add it"
    wording = _WORDING.get(kind)
    if wording is not None:
        return wording(value, context) + ("" if kind in ("too_short", "too_long") else f" (it is {shown(value)})")
    return message  # a sentence of ours (a PydanticCustomError), or pydantic's for a type we never meet


def _items(count: int) -> str:
    return f"{count} item" if count == 1 else f"{count} items"


def _whole_number(value: Any, _context: Mapping[str, Any]) -> str:
    if isinstance(value, str) and value.strip().isdigit():
        return "must be a whole number, not a string: write it without quotes"
    return "must be a whole number, such as 8080"


_WORDING = {
    # pydantic's error types, in our words: what is wrong and what would be right. The value is
    # added after each, as "(it is ...)", but for lists (their length is).
    "int_type": _whole_number, "int_parsing": _whole_number, "int_from_float": _whole_number,
    "greater_than_equal": lambda _value, context: f"must be at least {context['ge']}",
    "greater_than": lambda _value, context: f"must be more than {context['gt']}",
    "less_than_equal": lambda _value, context: f"must be at most {context['le']}",
    "less_than": lambda _value, context: f"must be less than {context['lt']}",
    "string_type": lambda _value, _context: "must be a string",
    "string_too_short": lambda _value, context: "must not be empty" if context["min_length"] == 1 else
    f"must have at least {context['min_length']} characters",
    "string_too_long": lambda _value, context: f"is too long: at most {context['max_length']} characters",
    "too_short": lambda _value, context: f"needs at least {_items(context['min_length'])} (it has "
                                         f"{context['actual_length']})",
    "too_long": lambda _value, context: f"may have at most {_items(context['max_length'])} (it has "
                                        f"{context['actual_length']})",
    "list_type": lambda _value, _context: "must be a list",
    "dict_type": lambda _value, _context: "must be a mapping (key: value)",
    "model_type": lambda _value, _context: "must be a mapping of fields (name: value)",
    "model_attributes_type": lambda _value, _context: "must be a mapping of fields (name: value)",
    "bool_type": lambda _value, _context: "must be true or false",
    "bool_parsing": lambda _value, _context: "must be true or false",
    "enum": lambda _value, context: f"must be {context['expected']}",
    "literal_error": lambda _value, context: f"must be {context['expected']}",
}


def shown(value: Any) -> str:
    """A value as a user should see it: quoted, control characters escaped, long ones cut, and
    characters that look like ASCII but are not (full-width digits, a non-breaking space) named."""
    if not isinstance(value, str):
        return "null" if value is None else str(value).lower() if isinstance(value, bool) else repr(value)[:80]
    text = repr(value) if len(value) <= 80 else repr(value[:60]) + f"... ({len(value)} characters)"
    lookalikes = sorted({c for c in value if _lookalike(c)})
    if lookalikes:
        text += " (with " + ", ".join(f"{c!r}, U+{ord(c):04X} {unicodedata.name(c, 'unnamed')}"
                                      for c in lookalikes[:3]) + ")"
    return text


def _lookalike(character: str) -> bool:
    """A non-ASCII digit, space or invisible character, or one that stands for an ASCII one."""
    if character.isascii() or unicodedata.category(character) == "Cs":  # lone surrogates: said otherwise
        return False
    return unicodedata.category(character)[0] in "NZC" or unicodedata.normalize("NFKC", character).isascii()


def problem(kind: str, sentence: str, *, at: str = "") -> PydanticCustomError:
    """An error whose message is `sentence`, as is; `at` extends its location (such as `[0].addresses[1]`)
    where a check of a whole list finds one item wrong."""
    return PydanticCustomError(kind, "{sentence}", {"sentence": sentence, "at": at} if at else {"sentence": sentence})


_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")
"""Dotted decimal as inet_pton reads it: four numbers 0-255, no leading zeros, ASCII digits only."""
dotted_ipv4 = _IPV4.fullmatch
"""A match if a str is an IPv4 address as inet_pton reads it (None: ask `ip_problem`)."""


def ip_literal(value: Any, family: Literal["IPv4", "IPv6"] | None = None, *, why: str = "") -> str:
    """`value` if it is an IP literal Envoy parses (of `family`, when given), else a problem whose
    sentence ends with `why`."""
    wrong = ip_problem(value, family)
    if wrong is not None:
        raise problem("ip_address", wrong + why)
    return value


def ip_problem(value: Any, family: Literal["IPv4", "IPv6"] | None = None) -> str | None:
    """What keeps `value` from being an IP literal Envoy parses (of `family`, when given), or None.

    Envoy parses an address with inet_pton (IPv4: four decimal numbers, no leading zeros) or, for
    IPv6, getaddrinfo(AI_NUMERICHOST); Python's `ipaddress` agrees with it on every ASCII string we
    tried (tests/test_envoy_refuses.py). Two more are refused, as Kubernetes' CEL `isIP()` and its
    EndpointSlice validation refuse them: a zone (fe80::1%eth0: whether Envoy takes it depends on
    the interfaces of the host it runs on) and an IPv4-mapped IPv6 address (::ffff:10.0.0.1)."""
    if family != "IPv6" and isinstance(value, str) and _IPV4.fullmatch(value):
        return None  # the common case, 10x faster than ipaddress (every endpoint of every translation)
    address = None
    if isinstance(value, str) and value.isascii():
        try:
            address = ipaddress.ip_address(value)
        except ValueError:
            pass
    if address is None:
        return f"{shown(value)} is not an {family or 'IP'} address"
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        return (f"{shown(value)} has an IPv6 zone ('%{address.scope_id}'), which depends on the interfaces of "
                "each Envoy's host: write the address alone")
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return f"{shown(value)} is an IPv4-mapped IPv6 address: write it as {address.ipv4_mapped}"
    if family is not None and f"IPv{address.version}" != family:
        return f"{shown(value)} is not an {family} address"
    return None


def port_number(value: Any) -> int:
    """A TCP port, 1-65535 (Envoy takes 0 too, but nothing listens on port 0)."""
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535:
        return value
    raise problem("port", f"{shown(value)} is not a port number (1-65535)")


_DNS_LABEL = re.compile(DNS_LABEL)  # compiled once: every Backend's service port is checked


def port_or_name(value: Any) -> int | str:
    """A Service port by number (1-65535) or by name (a DNS label, as Kubernetes names Service ports)."""
    if isinstance(value, str) and _DNS_LABEL.fullmatch(value) and len(value) <= 63:
        return value
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        raise problem("port", f"{value} is not a port number (1-65535)")
    raise problem("port", f"{shown(value)} is neither a port number (1-65535) nor a port name "
                          "(a DNS label of at most 63 characters: lowercase letters, digits and '-', such as http)")

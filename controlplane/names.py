"""Kubernetes naming rules, shared by every input that names a workload: the mesh file, node metadata.

Plain predicates over strings; the callers turn a False into an error naming their own field.
"""

from __future__ import annotations

import re

DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
"""RFC 1123 label, as Kubernetes namespaces use (63 characters at most)."""
DNS_NAME = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
"""RFC 1123 subdomain, as pod and service-account names use (253 characters at most)."""
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
MAX_LABELS = 64
"""More labels than a workload plausibly carries; a bound on what a caller can make us hold."""


def is_label_key(key: str) -> bool:
    """`[prefix/]name`: the prefix a DNS subdomain, the name 63 characters at most."""
    prefix, _, name = key.rpartition("/")
    return bool(_LABEL_NAME.match(name)) and (not prefix or bool(DNS_NAME.match(prefix)))


def is_label_value(value: str) -> bool:
    return bool(LABEL_VALUE.match(value))

"""The v3 PurposeOfUse hierarchy (HL7 v3 ActReason, PurposeOfUse branch) as data.

A consent naming a purpose also covers that purpose's descendants: a consent for TREAT
applies to an ETREAT request. Codes outside this table are unknown and rejected at the edge.
"""

from __future__ import annotations

# child -> parent, from the v3-ActReason PurposeOfUse specialisations.
_PARENT: dict[str, str] = {
    # treatment
    "ETREAT": "TREAT", "BTG": "ETREAT", "ERTREAT": "ETREAT",
    "CLINTRCHPC": "TREAT", "COC": "TREAT", "POPHLTH": "TREAT",
    # payment
    "CLMATTCH": "HPAYMT", "COVAUTH": "HPAYMT", "COVERAGE": "HPAYMT", "ELIGDTRM": "HPAYMT",
    "ELIGVER": "HPAYMT", "ENROLLM": "HPAYMT", "MILDCRG": "HPAYMT", "REMITADV": "HPAYMT",
    # operations
    "CAREMGT": "HOPERAT", "DONAT": "HOPERAT", "FRAUD": "HOPERAT", "GOV": "HOPERAT",
    "HACCRED": "HOPERAT", "HCOMPL": "HOPERAT", "HDECD": "HOPERAT", "HDIRECT": "HOPERAT",
    "HDM": "HOPERAT", "HLEGAL": "HOPERAT", "HOUTCOMS": "HOPERAT", "HPRGRP": "HOPERAT",
    "HQUALIMP": "HOPERAT", "HSYSADMIN": "HOPERAT", "LABELING": "HOPERAT", "METAMGT": "HOPERAT",
    "MEMADMIN": "HOPERAT", "MILCDM": "HOPERAT", "PATADMIN": "HOPERAT", "PATSFTY": "HOPERAT",
    "PERFMSR": "HOPERAT", "RECORDMGT": "HOPERAT", "SYSDEV": "HOPERAT", "TRAIN": "HOPERAT",
    # research
    "BIORCH": "HRESCH", "CLINTRCH": "HRESCH", "DSRCH": "HRESCH", "POARCH": "HRESCH",
    "TRANSRCH": "HRESCH", "CLINTRCHNPC": "CLINTRCH", "PRECLINTRCH": "CLINTRCH",
    # patient request
    "FAMRQT": "PATRQT", "PWATRNY": "PATRQT", "SUPNWK": "PATRQT",
    # public health
    "DISASTER": "PUBHLTH", "THREAT": "PUBHLTH",
}
_ROOTS = frozenset(
    {"TREAT", "HPAYMT", "HOPERAT", "HRESCH", "PATRQT", "PUBHLTH", "HMARKT", "HPRGRP", "HSYSADMIN",
     "PUBHLTH", "HCOMPL", "HLEGAL", "HDIRECT", "CAREMGT"}
)
PURPOSE_CODES: frozenset[str] = frozenset(_PARENT) | _ROOTS | frozenset(_PARENT.values())
RESEARCH_PURPOSES: frozenset[str] = frozenset({"HRESCH", "CLINTRCH"})


def lineage(code: str) -> tuple[str, ...]:
    """The code and its ancestors, nearest first: ``ETREAT`` -> ``("ETREAT", "TREAT")``."""
    chain = [code]
    while chain[-1] in _PARENT and len(chain) < 8:
        chain.append(_PARENT[chain[-1]])
    return tuple(chain)


def is_research(code: str) -> bool:
    """True for research purposes (HRESCH and everything under it)."""
    return "HRESCH" in lineage(code)

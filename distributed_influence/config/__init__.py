"""The settings of an audit: one dataclass, validated once, hashed for resume."""

from distributed_influence.config.audit import SCORING, TARGETS, AuditConfig

__all__ = ["AuditConfig", "SCORING", "TARGETS"]

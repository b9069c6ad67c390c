"""The CRDs as pydantic models: the schemas in crds/ are generated from them
(``hack/gen_crds.py``) and the operator parses specs through them, so a field cannot
differ between what the API server accepts and what the operator reads."""

from gpucloud.crd import (
    account,
    gpuinstance,
    modeldeployment,
    pricebook,
    recharge,
    rechargereview,
    storageitems,
)
from gpucloud.crd.k8s import SpecError, parse
from gpucloud.crd.schema import Definition

# in the order hack/gen_crds.py has always written them
DEFINITIONS: tuple[Definition, ...] = (
    pricebook.DEFINITION,
    account.DEFINITION,
    recharge.DEFINITION,
    rechargereview.DEFINITION,
    gpuinstance.DEFINITION,
    modeldeployment.DEFINITION,
    storageitems.CLOUD_DISK,
    storageitems.IMAGE,
)

__all__ = ["DEFINITIONS", "Definition", "SpecError", "parse"]

"""The GPUInstance reconciler, one room per concern (see ``reconciler`` for the map and
``concurrency`` for the locks and caches)."""

from gpucloud_operator.instances.core import Pass
from gpucloud_operator.instances.kubeapi import PLURAL, KubeAPI, Obj
from gpucloud_operator.instances.reconciler import InstanceReconciler

__all__ = ["PLURAL", "InstanceReconciler", "KubeAPI", "Obj", "Pass"]

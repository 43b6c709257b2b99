"""Test support, loaded through PYTHONPATH by tests/test_distributed.py only: lets accelerate and the Trainer run
FSDP1 on CPU over gloo, so finechat's FSDP path (LoRA layers as FSDP units, adapter files, checkpoints, --resume)
can be checked without GPUs. What is patched away is what stops FSDP on CPU, nothing of finechat's own:
- accelerate turns FSDP on only for accelerator devices, and builds its plugin only where a GPU-like device exists;
- FSDP1 broadcasts module states only from GPUs (sync_module_states) and wants device_id "cpu", not "cpu:0";
- a full state dict "offloaded to CPU" from CPU tensors keeps views into storage that resharding then frees;
- finechat.distributed.choose refuses FSDP without CUDA (rightly, for users).
FINECHAT_FSDP_CPU_SIM_MIXED_PRECISION=bf16 turns on the mixed precision a GPU run has (finechat asks for bf16 on CUDA
only), with what accelerate does to FSDP models under it: trainable flat parameters are upcast to float32."""

import os

if os.environ.get("FINECHAT_FSDP_CPU_SIM") == "1":
    import dataclasses

    import accelerate.state as _state
    import accelerate.utils.dataclasses as _dc
    import torch
    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import api as _api
    from torch.distributed.fsdp import fully_sharded_data_parallel as _fsdp

    import finechat.distributed as _distributed

    _state_init = _state.AcceleratorState.__init__

    def _state_init_cpu_fsdp(self, *args, fsdp_plugin=None, **kwargs):
        _state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            # As AcceleratorState does for GPUs: every later AcceleratorState() copies the PartialState's type back.
            _state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            mixed = os.environ.get("FINECHAT_FSDP_CPU_SIM_MIXED_PRECISION")
            if mixed:
                self._mixed_precision = mixed
                fsdp_plugin.set_mixed_precision(mixed)

    _state.AcceleratorState.__init__ = _state_init_cpu_fsdp

    _plugin_post_init = _dc.FullyShardedDataParallelPlugin.__post_init__

    def _plugin_post_init_cpu(self):
        self.sync_module_states = False
        _plugin_post_init(self)

    _dc.FullyShardedDataParallelPlugin.__post_init__ = _plugin_post_init_cpu

    for _cls in (_api.StateDictConfig, _api.OptimStateDictConfig):
        _cls.offload_to_cpu = property(lambda self: False, lambda self, value: None)

    _fsdp_init = _fsdp.FullyShardedDataParallel.__init__

    def _fsdp_init_cpu(self, module, *args, device_id=None, **kwargs):
        if device_id is not None and torch.device(device_id).type == "cpu":
            device_id = torch.device("cpu")
        _fsdp_init(self, module, *args, device_id=device_id, **kwargs)

    _fsdp.FullyShardedDataParallel.__init__ = _fsdp_init_cpu

    _choose = _distributed.choose

    def _choose_fsdp_on_cpu(plan, requested, *args):
        if requested == "fsdp" and plan.world_size > 1:
            return dataclasses.replace(plan, mode="fsdp")
        return _choose(plan, requested, *args)

    _distributed.choose = _choose_fsdp_on_cpu

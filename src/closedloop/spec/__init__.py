"""The template schema and its loader (:mod:`.schema`), the request (:mod:`.request`) and incident
(:mod:`.incident`) schemas, and the pipeline's description (:mod:`.describe`): one validation style."""

from closedloop.spec.schema import (  # noqa: F401 - the public names of the spec package
    CACHEABLE_STEPS,
    RETRYABLE_STEPS,
    AlertSpec,
    ApprovalSpec,
    GateSpec,
    KpiRuleSpec,
    LoadedSpec,
    PipelineSpec,
    PodSpec,
    load_all,
    load_spec,
    template_files,
)

"""The drivers of the one compile path: :mod:`.compile` (ONNX -> .so), :mod:`.tune` (MetaSchedule +
XGBoost) and :mod:`.database` (where the schedules come from)."""

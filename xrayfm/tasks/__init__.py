"""Task heads on a backbone: metrics, feature cache, classify / segment / detect training and evaluation.

See docs/heads.md. Modules: :mod:`metrics` (numpy/scipy metrics with defined edge cases),
:mod:`data` (lake + synth labels -> :class:`~xrayfm.tasks.data.LabeledImage`), :mod:`features`
(feature cache), :mod:`train` (training, prediction, head bundles), :mod:`evaluate`
(metrics documents, embeddings), and one module per task.
"""

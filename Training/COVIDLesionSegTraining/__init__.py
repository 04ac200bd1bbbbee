"""COVIDLesionSegTraining — train and evaluate the paper's four networks on COVID-19-CT-Seg.

Imports models and preprocessing from the core (``COVIDLesionSegLib``); the core never imports this package.

Modules: ``data`` (slice datasets: the shared PNG manifest and the original NIfTI release), ``augment``
(none / flip / robust slice augmentation), ``splits`` (paper, patient k-fold, benchmark and hold-out
splits), ``config`` (``TrainConfig``, saved with every run and checkpoint), ``train`` (the training loop,
``covidlesionseg-train``), ``evaluate`` (confusion-matrix metrics, ``covidlesionseg-evaluate``) and ``reproduce``
(the paper's Table 3 and Figures 5–7 for the four models, ``covidlesionseg-reproduce``).
"""

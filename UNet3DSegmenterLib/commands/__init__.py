"""The command line: one module per command (``predict``, ``train``, ``evaluate``, ``convert``,
``dicom_sort``, ``demo``, ``info``) and :mod:`.cli`, which builds the parser from them and turns user
mistakes into one-line errors."""

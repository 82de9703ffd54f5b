"""Limits, measured (section VII of the seed document): hallucination and abstention, calibration, bias,
position bias, reversal curse, arithmetic length generalisation; `glassmind eval RUN --suite NAME` runs one,
`glassmind report RUN` gathers a run's results into one HTML page."""

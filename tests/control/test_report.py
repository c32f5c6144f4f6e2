"""The suite report: the table and the plot."""

from tensorwire.control.report import format_table, plot
from tensorwire.control.simulate import Scenario, example_library, run_suite


def test_table_and_plot(tmp_path):
    result = run_suite(example_library(), ["step"], Scenario(n_requests=150), seeds=(0,), library_label="placeholder")
    table = format_table(result)
    assert "placeholder" in table and "controller" in table and "oracle" in table
    png = tmp_path / "plot.png"
    plot(result, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

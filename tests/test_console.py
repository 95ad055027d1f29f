"""What the console says about speed: a rate below one per second is printed as seconds per item."""
from uvit_jax import console


def test_slow_rates_are_seconds_per_item_not_zero_per_second():
    assert console.format_rate(12.345, "step") == "12.3 steps/s"
    assert console.format_rate(1 / 41.2, "step") == "41.2 s/step"  # printed "0.0 steps/s" before
    assert console.format_rate(0.5 * 8, "image") == "4.0 images/s"


def test_progress_of_a_slow_pass_says_seconds_per_image(monkeypatch, caplog):
    now = [1000.0]
    monkeypatch.setattr(console.time, "time", lambda: now[0])
    progress = console.Progress("features", 10, every_s=0)
    with caplog.at_level("INFO"):
        now[0] += 30.0
        progress.update(2)
    assert [r.getMessage() for r in caplog.records] == ["features: 2/10 images  15.0 s/image  ETA 2m00s"]

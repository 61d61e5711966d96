import subprocess
import sys

from lungsynth.cli import main


def test_help_lists_subcommands(capsys):
    try:
        main(["--help"])
    except SystemExit as exc:
        assert exc.code == 0
    out = capsys.readouterr().out
    for command in ("course", "data", "autoencoder", "land", "bbox-ldm", "hr-ldm", "lung-ddpm", "text2img",
                    "synth", "evaluate", "downstream", "bench"):
        assert command in out


def test_course_list_prints_chapters_in_order(capsys):
    assert main(["course", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    numbers = [line.split()[0] for line in lines]
    assert numbers[0] == "00" and numbers == sorted(numbers)
    assert "Welcome" in lines[0]


def test_unknown_profile_is_one_clear_error():
    proc = subprocess.run([sys.executable, "-m", "lungsynth", "course", "list", "--profile", "huge"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown profile 'huge'; valid profiles: smoke, course, full" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_chapter_is_an_error():
    proc = subprocess.run([sys.executable, "-m", "lungsynth", "course", "run", "--only", "42"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "valid chapters: 00" in proc.stderr

"""Native libraries' notices held back at the file descriptor, their error lines passed on."""

import os

from gemma_export import quiet


def test_native_stdout_keeps_json_output_clean(capfd):
    print("before", flush=True)
    with quiet.native_stdout():
        os.write(1, b" # LIBNATIVE: No alternate configuration present\nERROR: the HTP library failed\n")
    print("after", flush=True)
    out, err = capfd.readouterr()
    assert out == "before\nafter\n"
    assert err == "ERROR: the HTP library failed\n"


def test_native_info_lines_pass_on_errors_only(capfd):
    with quiet.native_info_lines():
        os.write(2, b"I0000 accelerator registered\nE0000 delegate failed\n")
    out, err = capfd.readouterr()
    assert (out, err) == ("", "E0000 delegate failed\n")

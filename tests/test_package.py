import subprocess
import sys


def test_import_is_lean():
    """`import megaclass` initialises no CUDA and loads no optional backend."""
    code = (
        "import sys, megaclass, megaclass.heads, megaclass.schema;"
        "heavy = [m for m in ('triton', 'annoy', 'transformers', 'grpc', 'tensorboard', 'matplotlib',"
        " 'sklearn', 'PIL')"
        " if m in sys.modules];"
        "import torch;"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised at import';"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"heavy modules imported: {out.stdout.strip()}"


def test_top_level_example_runs():
    """The example in ``megaclass``'s docstring works as written."""
    import doctest

    import megaclass

    result = doctest.testmod(megaclass)
    assert result.attempted > 0 and result.failed == 0

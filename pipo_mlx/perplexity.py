"""`python -m pipo_mlx.perplexity`: a PIPO model's perplexity on a text or JSONL file (see pipo_mlx/cli/perplexity.py)."""

from pipo_mlx.cli.perplexity import main

if __name__ == "__main__":
    main()

from dask_safe_worker.cli import main

main()

from dask_safe_worker.entry import main

main()

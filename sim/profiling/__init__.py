"""``tandem profile``: measure step times on a GPU and fit the cost model.

``gpu`` needs PyTorch and a CUDA GPU and is imported only on the measuring path; everything else
here (shapes, fitting, the raw-measurement file, reports) is plain CPU code.
"""

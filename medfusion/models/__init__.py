"""Model layer: encoders and fusion heads (``registry``), the network (``net``), kernel-level
fusion (``kernel``), clinical preprocessing (``clinical``) and the safe model package
(``package``). Submodules are imported on use so that ``import medfusion.models`` stays cheap.
"""

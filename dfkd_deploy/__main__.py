"""``python -m dfkd_deploy`` = the ``dfkd-deploy`` command; also what ``torchrun -m dfkd_deploy`` runs."""
from dfkd_deploy.cli import main

if __name__ == "__main__":
    main()

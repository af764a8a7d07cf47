"""MONAI Label sessions holding one validated study file.

A session lets a client run inference on a study without adding it to the datastore. MONAI Label's
`Sessions` stores whatever arrives -- several files become a directory, which its GET endpoint then
fails to serve (HTTP 500) and no task here can read. A study is one file, so a session takes exactly
one file that reads as a study; anything else is a 422 and nothing is stored.
"""

from __future__ import annotations

import os
import shutil

from fastapi import HTTPException
from monailabel.utils.sessions import Sessions

from lib.errors import http_errors
from parotid import safe_read


class StudySessions(Sessions):
    def add_session(self, data_file: str, expiry: int = 0, uncompress: bool = False, session_id=None):
        try:
            if uncompress or os.path.isdir(data_file):
                raise HTTPException(422, "a session holds one study file (.nii.gz); upload the study itself, "
                                         "not an archive or several files")
            with http_errors():  # read in a contained child process (parotid.safe_read)
                safe_read.check_file(data_file, "study", name="session upload")
        except HTTPException:
            shutil.rmtree(data_file, ignore_errors=True) if os.path.isdir(data_file) else os.remove(data_file)
            raise
        return super().add_session(data_file, expiry, uncompress=False, session_id=session_id)

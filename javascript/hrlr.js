// HighRes-LowRAM tab: hand the webui's job queue a task id and follow its progress
// (progress bar, live preview) in our gallery, as the txt2img tab does.

function hrlr_submit() {
    var id = randomId();
    var gallery = gradioApp().getElementById('hrlr_gallery');
    var container = gradioApp().getElementById('hrlr_gallery_container');
    var memory = gradioApp().getElementById('hrlr_memory');
    if (memory) {
        memory.classList.add('hrlr-running');
    }
    requestProgress(id, container, gallery, function() {
        if (memory) {
            memory.classList.remove('hrlr-running');
        }
    });
    var res = Array.from(arguments);
    res[0] = id;
    return res;
}

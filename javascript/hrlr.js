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

// the webui's paste buttons call switch_to_<tab> and recalculate_prompts_<tab> for the tab they fill
function switch_to_hrlr() {
    var tabs = gradioApp().querySelector('#tabs');
    var buttons = tabs ? tabs.querySelectorAll('.tab-nav > button') : [];
    for (var i = 0; i < buttons.length; i++) {
        if (buttons[i].textContent.trim() === 'HighRes-LowRAM') {
            buttons[i].click();
            break;
        }
    }
    return Array.from(arguments);
}

function recalculate_prompts_hrlr() {
    return Array.from(arguments);
}
